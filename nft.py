"""
nft.py — DiffusionNFT (Zheng et al., arXiv 2509.16117; code NVlabs/DiffusionNFT): the generator update of
`objective = "nft"`, a forward-process optimizer beside GRPO. The samples, the rewards, the discriminator
and its step are the GRPO path's, unchanged; only what the generator learns from the scores differs.

GRPO needs the log-probs of a stochastic reverse step. DiffusionNFT needs only clean images x0 (any
sampler: here the Euler ODE of all num_steps) and a score per image. It trains the velocity on the
*forward* process, contrasting an implicit positive and an implicit negative policy built from the
trained model v_θ and a slowly moving old model v_old:

  optimality   r = ½ + ½·clip(A / adv_clip, -1, 1) ∈ [0, 1],  A = (R - mean_prompt R) / (std R + 1e-4)
               (train.compute_advantages, the std over all rewards: global_std = True as published; the
               code clips A to ±5 and divides by 5: the paper's Z is 5 std)
  noising      x_t = (1 - t)·x0 + t·ε,  ε ~ N(0, I),  target v = ε - x0
  implicit     v⁺ = (1 - β)·v_old + β·v_θ         (the policy that makes the positives more likely)
               v⁻ = (1 + β)·v_old - β·v_θ         (its mirror image about v_old)
  loss         L = r·‖v⁺ - v‖² + (1 - r)·‖v⁻ - v‖²  per image, v_old detached
  old model    θ_old ← η·θ_old + (1 - η)·θ  after each generator update, η = min(eta_rate·s, eta_max),
               s = optimizer steps so far; the images are sampled by the *old* model

Checks the tests make: with r ≡ ½, L = ‖v_old - v‖² + β²‖v_θ - v_old‖², minimal (zero gradient) at
v_θ = v_old: a reward without preference changes nothing. With r ≡ 1, L is flow matching of v⁺ on the
samples. The gradient moves v_θ toward the targets of positives (r > ½) and away from those of negatives.

What the published code does on top, and we do too (defaults from its config/nft.py and config/base.py):
  - adaptive weighting: in x0 space, x̂0 = x_t - t·v⁺ (so x̂0 - x0 = t·(v - v⁺)), each branch's
    per-image mean squared error divided by its own detached mean absolute error (float64, ≥ 1e-5):
    ‖x̂0⁺ - x0‖² / mean|x̂0⁺ - x0|, likewise for v⁻. `nft_adaptive = False` gives the paper's plain L.
  - the loss is scaled by adv_clip / β (5 / β); gradients are clipped to max_grad_norm (1.0) after it.
  - timesteps: the sampler's own grid σ_0..σ_{N-1} (shifted, σ_0 = 1); each image is trained on a random
    int(0.99·N) of them (`nft_t_fraction`), without repetition, each with fresh noise ε; all of an epoch's
    passes accumulate into `updates_per_epoch` optimizer steps (published: 1 an epoch, 2 for OCR).
  - β = 1 (`nft_beta`; 0.1 in its OCR and multi-reward recipes); η = min(0.001·s, 0.5) (its decay_type 1;
    its OCR recipe's flat-then-steeper schedule is not offered); CFG off when sampling (guidance 1) and
    in the loss (the conditional velocity is trained); lr 3e-4, AdamW weight decay 1e-4, LoRA r32/α64;
    KL to the frozen base 1e-4·mean‖v_θ - v_ref‖² (our `beta_kl`; it costs a third forward per pass).
  - evaluation uses the EMA of θ (decay 0.9 after every optimizer step: the preset's ema_every = 1), not
    θ_old.

Where we depart from the published code: the Euler ODE sampler instead of its 2nd-order DPM-Solver (any
solver is allowed by the method); 10 sampling steps in the preset as published, but evaluation with our
eval_* keys. Sampling stays CFG-free whatever GRPO's guidance_scale (`nft_guidance_scale`): guided samples
teach it the guided velocity, guided again at evaluation (shapes world: 0.86 then falling; CFG-free 0.97).
The old model is a float32 shadow of the trainable tensors swapped in for its forwards (model.Shadow, as the
EMA; for a LoRA: the LoRA tensors only; full fine-tuning pays a full copy), instead of a second peft
adapter: one code path for LoRA and full fine-tuning, compile and DDP see the same modules. The per-group
std option (global_std = False) is ours to choose, as for GRPO.
"""

import contextlib

import numpy as np
import torch

from configurator import timesteps_per_image
import sampler as S


# -----------------------------------------------------------------------------------------------
# The maths: small pure functions (tests/test_nft.py)

def optimality(advantages, adv_clip):
    """r = ½ + ½·clip(A / adv_clip, -1, 1): the probability that an image is 'good', in [0, 1]."""
    return 0.5 + 0.5 * (advantages / adv_clip).clamp(-1, 1)


def implicit_velocities(v_theta, v_old, beta):
    """(v⁺, v⁻) = ((1-β)·v_old + β·v_θ, (1+β)·v_old - β·v_θ): v_old is a constant (detached)."""
    v_old = v_old.detach()
    return (1 - beta) * v_old + beta * v_theta, (1 + beta) * v_old - beta * v_theta


def forward_noise(x0, noise, t):
    """x_t = (1 - t)·x0 + t·ε for per-image times t (B,): the rectified-flow forward process."""
    t = t.reshape(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * noise                                               # (B, C, h, w)


def nft_loss(v_theta, v_old, x0, noise, t, r, beta, adaptive=True):
    """Per-image loss (B,): r·‖v⁺ - v‖² + (1-r)·‖v⁻ - v‖² (means over pixels), v = ε - x0.

    adaptive: each branch in x0 space, ‖x̂0 - x0‖² / mean|x̂0 - x0| (detached), x̂0 = x_t - t·v±, as the
    published code weights it (the weight makes every image and time contribute a comparable gradient)."""
    v_pos, v_neg = implicit_velocities(v_theta, v_old, beta)
    dims = tuple(range(1, x0.dim()))
    if not adaptive:
        v = noise - x0
        return r * ((v_pos - v) ** 2).mean(dims) + (1 - r) * ((v_neg - v) ** 2).mean(dims)
    x_t, tb = forward_noise(x0, noise, t), t.reshape(-1, *([1] * (x0.dim() - 1)))

    def branch(v_branch):
        err = x_t - tb * v_branch - x0                                              # x̂0 - x0 (B, C, h, w)
        with torch.no_grad():
            w = err.double().abs().mean(dims).clamp(min=1e-5).float()              # (B,)
        return (err ** 2).mean(dims) / w

    return r * branch(v_pos) + (1 - r) * branch(v_neg)


def eta_at(step, rate, eta_max):
    """The old model's decay after `step` optimizer steps: min(rate·step, eta_max) (0: θ_old = θ)."""
    return min(rate * step, eta_max)


def sampling_guidance(cfg):
    """The CFG scale an epoch is sampled with: nft's own (CFG-free as published), GRPO's guidance_scale."""
    return cfg.nft_guidance_scale if cfg.objective == "nft" else cfg.guidance_scale


def sampling_policy(gen):
    """What samples an epoch: the old model under nft, the current weights under GRPO (gen.old None)."""
    return gen.old.applied(gen.params) if gen.old is not None else contextlib.nullcontext()


# -----------------------------------------------------------------------------------------------
# The update's passes (train.train_generator runs them, as it does GRPO's)

TIMES = 4  # the named random stream of each image's times and noises (train.py names the others: 1, 2, 3, 7)


def image_generators(cfg, epoch, rank, n):
    """A generator per image of this rank, seeded by (seed, epoch, the image's index in the epoch, TIMES):
    its times, then the ε of each of its passes, in order; the same whatever the rank or micro-batch."""
    return [torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, epoch, rank * n + i, TIMES])
                                              .generate_state(2, np.uint64)[0] >> 1)) for i in range(n)]


def training_passes(cfg, gens, device, order=None):
    """[(micro-batch of image indices, time index per image (B,))] of one epoch: `order` [(micro-batch, k)],
    the k-th time of each image (train.training_passes: the same optimizer steps on any number of ranks;
    None: the images in order), each image on its own random subset of the grid's times (from `gens`)."""
    n, T = len(gens), timesteps_per_image(cfg)
    times = torch.stack([torch.randperm(cfg.num_steps, generator=g) for g in gens])         # (n, N)
    order = order or [(mb, k) for mb in torch.arange(n).split(cfg.train_batch_size) for k in range(T)]
    return [(mb.to(device), times[mb.cpu(), k].to(device)) for mb, k in order]


def velocity(model, gen, batch, mb, x_t, t):
    """The conditional velocity (no CFG: DiffusionNFT trains it alone) of images `mb` at x_t, times t."""
    return S.make_velocity_fn(model, batch["emb"][mb], batch["pool"][mb], autocast_dtype=gen.autocast)(x_t, t)


def passes(cfg, epoch, rank, gen, batch, advantages, order):
    """DiffusionNFT's per-pass loss, for train.train_generator's loop: loss_of(k, images mb, k-th time) ->
    (the NFT loss, info, v_θ, base(model) -> the velocity under `model`: what the β-KL compares), and
    finish(counters) -> the old model's soft update θ_old ← η·θ_old + (1-η)·θ after the epoch's steps.
    `order`: train.training_passes' (micro-batch, k) list; each image trains on its own random times."""
    gens = image_generators(cfg, epoch, rank, len(advantages))
    times = training_passes(cfg, gens, gen.device, order)
    r = optimality(advantages.float(), cfg.adv_clip)                                     # (n,)
    scale = cfg.adv_clip / cfg.nft_beta                                   # the published loss scale

    def loss_of(k, mb, _):
        ti = times[k][1]
        x0 = batch["latents"][mb].float()                                               # (B, C, h, w)
        eps = torch.stack([torch.randn(x0.shape[1:], generator=gens[i]) for i in mb.tolist()]).to(x0.device)
        t = gen.sigmas[ti]                                                               # (B,)
        x_t = forward_noise(x0, eps, t)
        with torch.no_grad(), gen.old.applied(gen.params):
            v_old = velocity(gen.sample_model, gen, batch, mb, x_t, t)
        v_theta = velocity(gen.train_model, gen, batch, mb, x_t, t)
        per_image = nft_loss(v_theta, v_old, x0, eps, t, r[mb], cfg.nft_beta, cfg.nft_adaptive)
        info = dict(nft_r=r[mb].mean().item(), old_deviation=((v_theta - v_old) ** 2).mean().item())
        return scale * per_image.mean(), info, v_theta, lambda model: velocity(model, gen, batch, mb, x_t, t)

    def finish(counters):
        eta = eta_at(counters["g_steps"], cfg.nft_eta_rate, cfg.nft_eta_max)
        gen.old.follow(gen.params, eta)                                   # θ_old ← η·θ_old + (1-η)·θ
        return dict(nft_eta=eta)
    return loss_of, finish
