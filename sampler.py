"""
sampler.py — the denoising steps with their log-probabilities, and the windowed rollout.

Pure functions of tensors: no DDP, no optimizer, no pipeline object. The model enters only through
`velocity_fn(x, sigma) -> v`, which `make_velocity_fn` builds from an SD3 transformer (with or
without classifier-free guidance), so the maths is testable with exact toy velocities.

Rectified flow (SD3): x_σ = (1-σ)·x0 + σ·ε, the transformer predicts v ≈ ε - x0, sigmas run from
σ_0 = 1 down to σ_N = 0, and one step has dt = σ_{i+1} - σ_i < 0. Three kinds of step:

  ode  x' = x + dt·v                                              (Euler; deterministic)
  sde  Flow-GRPO's SDE with the ODE's marginals; log-prob = exact Gaussian log-density
  cps  coefficient-preserving sampling (Adv-GRPO's choice); log-prob = -mean((x'-μ)²)

Both stochastic means are written as "the ODE step + a correction ∝ x̂1", where x̂1 = x + (1-σ)·v is
the model's estimate of the noise ε. With noise_level = 0 the correction is exactly zero, so the
step *is* the Euler step bit for bit (a test checks it).

Departs from the published code: nothing in the maths. The CPS log-prob is the same unscaled
surrogate (no 1/(2s²), no constants) as the published code — this is why its clip range is 1e-5 —
kept on purpose so that published hyper-parameters transfer.
"""

import math

import torch

STEP_KINDS = ("ode", "sde", "cps")


def _bcast(t, x):
    """A float or a (B,) tensor of sigmas, as a float32 tensor broadcastable against x (B, C, H, W)."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    return t.reshape(-1, *([1] * (x.dim() - 1))) if t.dim() > 0 else t


def sde_step(v, x, sigma, sigma_next, noise_level, kind, prev_sample=None, generator=None, noise=None):
    """One denoising step from σ to σ_next. Returns (x_next, log_prob (B,), mean, std).

    When `prev_sample` is given it is not drawn but returned as x_next and scored: that is how the
    training step recomputes log-probs of a stored trajectory under the current weights. `noise`
    (standard normal, shaped like x) replaces the draw from `generator` when given.
    Always computed in float32: in bf16 the s²/σ terms overflow and the log-probs lose all precision."""
    if kind not in STEP_KINDS:
        raise ValueError(f"step kind must be one of {STEP_KINDS}, got {kind!r}")
    v, x = v.float(), x.float()
    s_, sn = _bcast(sigma, x), _bcast(sigma_next, x)
    dt = sn - s_                                          # < 0
    x_ode = x + dt * v                                    # the Euler step
    x1_hat = x + (1 - s_) * v                             # predicted noise ε̂ (= x̂1)

    if kind == "ode":
        mean, std = x_ode, torch.zeros_like(s_)
    elif kind == "sde":
        # s = a·sqrt(σ/(1-σ)); at σ = 1 the denominator uses σ_next (= σ_1 on the first step).
        s = noise_level * torch.sqrt(s_ / (1 - torch.where(s_ >= 1, sn, s_)))
        mean = x_ode + (s ** 2 * dt / (2 * s_)) * x1_hat
        std = s * torch.sqrt(-dt)
    else:  # cps
        s = sn * math.sin(noise_level * math.pi / 2)      # the noise injected at this step
        # μ = (1-σn)·x̂0 + sqrt(σn² - s²)·x̂1 with x̂0 = x - σ·v. Since (1-σn)·x̂0 + σn·x̂1 is exactly
        # the Euler step, μ = Euler + (sqrt(σn² - s²) - σn)·x̂1: the noise s is paid for by
        # shrinking the x̂1 coefficient, so the total "noise energy" σn² is preserved.
        mean = x_ode + (torch.sqrt(sn ** 2 - s ** 2) - sn) * x1_hat
        std = s

    if prev_sample is None:
        if kind == "ode":
            x_next = mean
        else:
            if noise is None:
                noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
            x_next = mean + std * noise.to(mean)
    else:
        x_next = prev_sample.float()

    dims = tuple(range(1, x.dim()))
    if kind == "ode":
        log_prob = torch.zeros(x.shape[0], device=x.device)
    elif kind == "sde":
        # Exact Gaussian log-density, averaged (not summed) over pixels as in Flow-GRPO. std = 0
        # (noise_level 0) has no density: report 0 there instead of NaN.
        safe = torch.where(std > 0, std, torch.ones_like(std))
        lp = -((x_next - mean) ** 2) / (2 * safe ** 2) - torch.log(safe) - 0.5 * math.log(2 * math.pi)
        log_prob = torch.where(std > 0, lp, torch.zeros_like(lp)).mean(dim=dims)
    else:
        log_prob = -((x_next - mean) ** 2).mean(dim=dims)  # the published unscaled surrogate
    return x_next, log_prob, mean, std


def make_velocity_fn(transformer, prompt_embeds, pooled, neg_embeds=None, neg_pooled=None,
                     guidance_scale=1.0, autocast_dtype=None):
    """Close over the conditioning: returns v(x, sigma) for a batch of B latents.

    With guidance_scale > 1 the batch is doubled — [uncond; cond] in one forward — and
    v = v_u + g·(v_c - v_u). neg_* are the embeddings of "" (batch 1, or B), broadcast to the batch. SD3
    takes the timestep as σ·1000."""
    guided = guidance_scale > 1.0  # classifier-free guidance
    if guided:
        emb = torch.cat([neg_embeds.expand_as(prompt_embeds), prompt_embeds])      # (2B, T, D)
        pool = torch.cat([neg_pooled.expand_as(pooled), pooled])                   # (2B, P)
    else:
        emb, pool = prompt_embeds, pooled

    def velocity(x, sigma):
        b = x.shape[0]
        t = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(b) * 1000
        x_in, t_in = (torch.cat([x, x]), torch.cat([t, t])) if guided else (x, t)
        with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = transformer(hidden_states=x_in.to(emb.dtype), timestep=t_in, encoder_hidden_states=emb,
                              pooled_projections=pool, return_dict=False)[0]
        out = out.float()
        if not guided:
            return out
        v_u, v_c = out.chunk(2)
        return v_u + guidance_scale * (v_c - v_u)

    return velocity


def window_steps(num_steps, window_start, window_size):
    """The step indices that are stochastic and trained: [w, w+K). Validated, not clipped."""
    if not 0 <= window_start <= num_steps - window_size:
        raise ValueError(f"training window [{window_start}, {window_start + window_size}) does not fit in "
                         f"{num_steps} steps")
    return list(range(window_start, window_start + window_size))


@torch.no_grad()
def rollout(velocity_fn, noise, sigmas, noise_level=0.8, kind="cps", window_start=0, window_size=2,
            generator=None, step_noise=None, decode_fn=None):
    """Sample from `noise` (B, C, h, w) along `sigmas` (N+1,), stochastic only inside the window.

    Returns a dict:
      latents    (B, C, h, w)      final clean latents
      images     (B, 3, H, W)      decode_fn(latents) in [0, 1], when decode_fn is given
      x, x_next  (B, K, C, h, w)   the window's latents before / after each trained step
      step_idx   (K,)              their indices into sigmas
      log_probs  (B, K)            the old log-probs of the trained steps ((B, 0) without a window)
    Outside the window steps are plain Euler (ODE); with window_size = 0 the whole run is ODE.
    The window's noise is drawn from `generator`, or taken from `step_noise` (B, K, C, h, w) when given
    (train.py draws it per image so a sample does not depend on its batch-mates or the world size)."""
    n = len(sigmas) - 1
    trained = window_steps(n, window_start, window_size) if window_size else []
    x = noise.float()
    xs, xs_next, logps = [], [], []
    for i in range(n):
        v = velocity_fn(x, sigmas[i])
        step_kind = kind if i in trained else "ode"
        eps = step_noise[:, trained.index(i)] if step_noise is not None and i in trained else None
        x_next, lp, _, _ = sde_step(v, x, sigmas[i], sigmas[i + 1], noise_level, step_kind,
                                    generator=generator, noise=eps)
        if i in trained:
            xs.append(x), xs_next.append(x_next), logps.append(lp)
        x = x_next
    out = dict(latents=x, step_idx=torch.tensor(trained, dtype=torch.long),
               log_probs=torch.stack(logps, 1) if trained else x.new_zeros(x.shape[0], 0))  # (B, K)
    if trained:
        out.update(x=torch.stack(xs, 1), x_next=torch.stack(xs_next, 1))
    if decode_fn is not None:
        out["images"] = decode_fn(x)
    return out


def decode_latents(vae, latents, chunk=16):
    """SD3 latents → images in [0, 1], decoded `chunk` images at a time to bound activation memory."""
    sf, sh = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    outs = []
    for z in latents.split(chunk):
        img = vae.decode(z.to(vae.dtype) / sf + sh, return_dict=False)[0]
        outs.append((img.float() / 2 + 0.5).clamp(0, 1))
    return torch.cat(outs)                                 # (B, 3, H, W)


def flow_sigmas(scheduler, num_steps, device="cpu"):
    """The scheduler's N+1 sigmas (shift applied, final 0), as a float32 copy on `device` (a copy: the
    scheduler keeps and mutates its own tensor, e.g. in the next set_timesteps)."""
    scheduler.set_timesteps(num_steps, device=device)
    return scheduler.sigmas.to(device=device, dtype=torch.float32, copy=True)
