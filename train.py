"""
train.py — Adv-GRPO training of SD3 / SD3.5, top to bottom.

    python train.py config/tiny.py                          # one process (CPU or one GPU)
    torchrun --nproc_per_node=8 train.py config/sd35m_dino.py --lr=1e-4
    python train.py config/tiny.py --resume                 # continue from the newest checkpoint
    python train.py --help                                  # every config key (configurator.py)

Each epoch (the loop in `train`, one line a step):
  1. sample    a group of images per prompt; only a short SDE "window" of the ODE rollout is stochastic
  2. score     with the fixed rewards and the *current* adversary (the paper's: a head on frozen DINOv2
               features) against references
  3. advantages  rewards gathered over all ranks, normalised within each prompt's group
  4. schedule  who trains this epoch: the adversary (D), the generator (G), or both
  5. D update  the adversary's steps (DINO: hinge loss, references = real, generations = fake) on the
               inputs computed in 2
  6. G update  clipped GRPO on the log-probs of the window's transitions (LoRA); nft: DiffusionNFT (nft.py)
  7. log
  8. checkpoint

Owns: DDP set-up, the loop, the GRPO loss and advantages, the random streams, when to save. The config is
in configurator.py, the maths of a denoising step in sampler.py, the generator in model.py, rewards and
the adversaries (their scoring, steps and schedules) in reward.py, prompts and references in data.py,
held-out evaluation in eval.py, what a checkpoint holds in checkpoint.py.

Departs from the published Flow-GRPO / Adv-GRPO scripts: no accelerate (plain DDP: you can see when
gradients synchronise), no anomaly detection (3x slower), the old log-probs recomputed by the training
computation itself (see `train_generator`), the discriminator head in float32 and synchronised across
ranks, every random stream derived from (seed, epoch, image), not the rank (one rank or many train the same
weights), and the training window may start at random (`window_start = "random"`, the paper's text).
"""

import contextlib
import functools
import math
import os
import signal
import sys
import time

import configurator  # stdlib only: `python train.py --help` answers before torch loads (~7 s)
if __name__ == "__main__" and any(a in ("-h", "--help") for a in sys.argv[1:]):
    configurator.parse_args(sys.argv[1:])  # prints every key, its default and meaning, and exits

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

import archs
import checkpoint as C
import data
import eval as E
import model as M
import nft
import outputs as O
import reward as R
import sampler as S
from configurator import Config, step_chunks, timesteps_per_image, validate

# Named random streams: seed_of(cfg.seed, epoch, image, S) for the adversary's draws (DINO: its patch tokens)
# and the reference drawn per image, (seed, epoch, block, ORDER) for the micro-batch order (training_passes);
# the random window is seeded by (seed, epoch, WINDOW) alone. Nothing depends on the rank.
PATCHES, REFS, ORDER, WINDOW = 1, 2, 3, 7  # the values are the streams: changing one changes every result

# -----------------------------------------------------------------------------------------------
# GRPO maths: small pure functions (unit-tested)


def compute_advantages(rewards, group_ids, global_std=False, eps=1e-4, std=True):
    """A = (r - mean_group) / (std + eps), std of the group or (global_std) of all rewards; std=False:
    A = r - mean_group.

    `group_ids` are any hashables (train.py passes prompt strings, as the published code groups: a prompt
    listed twice is one group). Works on numpy arrays and torch tensors, returning the same type. std is
    the population std (ddof = 0), as in Flow-GRPO."""
    is_torch = torch.is_tensor(rewards)
    r = rewards.detach().double().cpu().numpy() if is_torch else np.asarray(rewards, dtype=np.float64)
    adv, index = np.zeros_like(r), {}
    keys = np.array([index.setdefault(g, len(index)) for g in group_ids])
    std_all = r.std()
    for k in range(len(index)):
        m = keys == k
        scale = (std_all if global_std else r[m].std()) + eps if std else 1.0
        adv[m] = (r[m] - r[m].mean()) / scale
    return (torch.as_tensor(adv, dtype=rewards.dtype, device=rewards.device) if is_torch
            else adv.astype(r.dtype))


def reward_signal(split, group_ids):
    """How much of the reward's within-group spread is signal, from two independent scores of the same
    images (split (n, 2): the split-half pair of discriminators, each trained on disjoint halves of the
    data): their correlation, pooled within groups (advantages only compare images of one group). Were each
    score signal + noise, the noises independent, the covariance would be var(signal) and each variance
    var(signal) + var(noise): the correlation is the signal's share of the variance (split-half reliability).
    1: a second discriminator ranks every group alike; ≈ 0: each ranks by what it happened to fit, and GRPO's
    normalised advantages make full-size steps of noise. 0 when nothing varies within groups; None
    without a pair. The scores of all ranks are gathered first (every rank computes the same number)."""
    if split is None:
        return None
    x = all_gather_cat(split).detach().double().cpu().numpy()
    index = {}
    keys = np.array([index.setdefault(g, len(index)) for g in group_ids])
    for k in range(len(index)):
        x[keys == k] -= x[keys == k].mean(0)                                 # centred within its group
    den = np.sqrt((x[:, 0] ** 2).sum() * (x[:, 1] ** 2).sum())
    rho = (x[:, 0] * x[:, 1]).sum() / den if den > 0 else 0.0
    return float(rho) if np.isfinite(rho) else 0.0


def grpo_loss(log_prob, old_log_prob, advantages, clip_range, adv_clip):
    """The clipped surrogate: mean(max(-A·ratio, -A·clip(ratio, 1±ε))), advantages clipped to ±adv_clip."""
    adv = advantages.clamp(-adv_clip, adv_clip)
    ratio = torch.exp(log_prob - old_log_prob)
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
    info = dict(clipfrac=((ratio - 1).abs() > clip_range).float().mean().item(),
                approx_kl=0.5 * ((log_prob - old_log_prob) ** 2).mean().item(), ratio=ratio.mean().item())
    return loss, info


def gap(info):
    """How far apart the discriminator sees this epoch's references and generations (before its step), in
    [-1, 1]: P(score(ref) > score(gen)) - P(score(gen) > score(ref)) were the scores normal, erf(d / 2),
    d = (mean_ref - mean_gen) / pooled std (from the moments the adversary reports, averaged over ranks:
    the same on any number of them). 0: they look alike to it; None when it reports no moments."""
    if "d_real_sq" not in info:
        return None
    var = (info["d_real_sq"] - info["d_real"] ** 2 + info["d_fake_sq"] - info["d_fake"] ** 2) / 2
    return math.erf((info["d_real"] - info["d_fake"]) / max(var, 1e-12) ** 0.5 / 2)


def step_scale(cfg, d_signal, d_gap):
    """What the advantages are multiplied by (beyond the paper; 1 is the paper): with adv_signal, the
    reward's signal share (the step shrinks as the discriminator's ranking turns into noise, instead of
    group normalisation blowing the noise up to full-size steps); with adv_gap, the gap (full steps while the
    discriminator tells generations from references, none once they look alike to it: the soft form of the
    published PickScore adversary's rule, whose generator waits while its images out-score the references).
    Each clipped to [0, 1]; the product when both are on."""
    scale = 1.0
    for on, value in ((cfg.adv_signal, d_signal), (cfg.adv_gap, d_gap)):
        scale *= min(max(value, 0.0), 1.0) if on and value is not None else 1.0
    return scale


def window_for_epoch(cfg, epoch):
    """Start of the trained window: fixed, or drawn from (seed, epoch) alone, so every rank draws the same
    window with no communication."""
    if cfg.window_start != "random":
        return int(cfg.window_start)
    # 0..N/2 inclusive as published (random.randint(0, N // 2)), capped so the window fits (N - K). The
    # published code reseeds with the rank before each draw (each rank: one window for good); here per epoch.
    hi = min(cfg.num_steps // 2, cfg.num_steps - cfg.window_size)
    return int(np.random.default_rng([cfg.seed, epoch, WINDOW]).integers(0, hi + 1))


def schedule(cfg, epoch, adversary, info, finite):
    """(adversary steps, train the generator?) for this epoch: nobody after a non-finite epoch, the
    generator alone without an adversary, else the adversary's own schedule (DINO: cfg.schedule;
    PickScore: its trigger). `info` and `finite` agree on every rank."""
    if not finite:
        return 0, False
    return (0, True) if adversary is None else adversary.schedule(cfg, epoch, info)


def seed_of(*keys):
    """A 63-bit seed from a tuple of ints: independent random streams per (seed, epoch, image, purpose)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> 1)


# -----------------------------------------------------------------------------------------------
# Distributed helpers

def setup_distributed():
    """torchrun → one process per GPU (nccl) or per CPU worker (gloo); plain python → world of 1."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size(), torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)  # bound to its GPU: no guessing in barrier()
    return dist.get_rank(), dist.get_world_size(), device


def all_gather_cat(t):
    """Concatenate a (n, ...) tensor from every rank, in rank order."""
    if not dist.is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def all_mean(values: dict, device):
    """Average a dict of floats over ranks."""
    if not dist.is_initialized() or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, (t / dist.get_world_size()).tolist()))


def all_finite(*tensors, device):
    """Whether every value of `tensors` is finite on every rank (one all-reduce: all ranks agree)."""
    ok = float(all(bool(torch.isfinite(t).all()) for t in tensors))
    return all_mean({"ok": ok}, device)["ok"] == 1.0


def no_sync(model):
    """DDP's no_sync (no gradient all-reduce in this backward) when there is more than one rank."""
    return model.no_sync() if isinstance(getattr(model, "_orig_mod", model),
                                         torch.nn.parallel.DistributedDataParallel) \
        else contextlib.nullcontext()


# -----------------------------------------------------------------------------------------------
# 1. Sampling: this rank's share of the epoch's images, with the trajectories needed to train on them

def per_image_noise(cfg, epoch, indices, shape, window_size):
    """Initial noise (B, C, h, w) and window noise (B, K, C, h, w) per image, each from a generator
    seeded by (seed, epoch, global image index): an image is the same whatever its batch or rank."""
    init, win = [], []
    for i in indices:
        g = torch.Generator().manual_seed(seed_of(cfg.seed, epoch, i))
        init.append(torch.randn(shape, generator=g))
        win.append(torch.randn((window_size, *shape), generator=g))
    return torch.stack(init), torch.stack(win)


@torch.no_grad()
def sample_epoch(cfg, epoch, gen, prompts, global_indices, window_start, progress=True):
    """Roll out every image of this rank (prompts[i] is image global_indices[i]). Returns per-image tensors:
    images (n, 3, H, W); latents (n, C, h, w); x, x_next (n, K, C, h, w) the window's transitions (GRPO);
    log_probs (n, K) the sampler's (K = 0 under nft); emb, pool the prompt embeddings; step_idx (K,)."""
    out, bs, window_size = [], cfg.sample_batch_size, 0 if cfg.objective == "nft" else cfg.window_size
    guidance = nft.sampling_guidance(cfg)  # nft: CFG-free
    for b in tqdm(range(0, len(prompts), bs), desc=f"epoch {epoch} sampling", leave=False,
                  disable=None if progress else True):  # None: no bar in a log file (not a terminal)
        p, idx = prompts[b:b + bs], global_indices[b:b + bs]
        emb, pool = gen.encode(p)
        noise, step_noise = per_image_noise(cfg, epoch, idx, gen.latent_shape(), window_size)
        vel = S.make_velocity_fn(gen.sample_model, emb, pool, *gen.encode([""]), guidance, gen.autocast)
        with nft.sampling_policy(gen):  # nft: its old model, all steps ODE; GRPO: the current weights
            r = S.rollout(vel, noise.to(gen.device), gen.sigmas, cfg.noise_level, cfg.sde_kind, window_start,
                          window_size, step_noise=step_noise.to(gen.device), decode_fn=gen.decode)
        out.append(dict(images=r["images"], latents=r["latents"], emb=emb, pool=pool,
                        **{k: r[k] for k in ("x", "x_next", "log_probs") if k in r}))
    batch = {k: torch.cat([o[k] for o in out]) for k in out[0]}
    batch["step_idx"] = r["step_idx"]
    return batch


# -----------------------------------------------------------------------------------------------
# 2. Scoring (the adversary's update, step 5, is its own: reward.Adversary.update)

def score_epoch(cfg, epoch, rank, batch, prompts, fixed_reward, adversary, references):
    """Rewards (n,) of this rank's images: the fixed rewards plus the *current* adversary's score against
    one reference per image (no step here). Also returns the split-half pair's scores (n, 2) or None (the
    adversary's health: reward_signal), the adversary's inputs for its steps (φ runs once per image per
    epoch) and info to log (the adversary's loss and accuracy before any step of this epoch, averaged over
    ranks: the schedule may read it)."""
    images, texts = batch["images"], [p["prompt"] for p in prompts]
    device = images.device
    rewards, info = torch.zeros(len(prompts), device=device), {}
    if fixed_reward is not None:
        r, info = fixed_reward(images, texts, prompts)
        rewards = rewards + r.to(device)
    if adversary is None:
        return rewards, None, None, info
    # A non-finite generation must not reach the adversary (it would poison it for good).
    if not all_finite(images, device=device):
        return torch.full_like(rewards, float("nan")), None, None, info
    ids = range(rank * len(texts), (rank + 1) * len(texts))  # the images' indices in the epoch: per image
    draws, refs = ([torch.Generator().manual_seed(seed_of(cfg.seed, epoch, i, k)) for i in ids]
                   for k in (PATCHES, REFS))
    real_images = torch.cat([references.sample([t], 1, g) for t, g in zip(texts, refs)])  # (n, 3, H, W)
    half = torch.tensor([i % 2 for i in ids])  # which head of the split-half pair learns from image i
    r, split, d_batch, d_info = adversary.judge(images, real_images.to(device), texts, batch["pool"], draws,
                                                half)
    return (rewards + adversary.weight * r.float().to(device), split, d_batch,
            {**info, **all_mean(d_info, device)})


# -----------------------------------------------------------------------------------------------
# 6. The generator update

def step_log_prob(cfg, gen, model, batch, mb, j):
    """Log-prob (B,) and mean of the stored transition x_j → x_{j+1} of images `mb` under `model`
    (the same CFG and step kind as sampling)."""
    i, sigmas = int(batch["step_idx"][j]), gen.sigmas
    vel = S.make_velocity_fn(model, batch["emb"][mb], batch["pool"][mb], *gen.encode([""]),
                             cfg.guidance_scale, gen.autocast)
    x = batch["x"][mb, j]
    _, logp, mean, _ = S.sde_step(vel(x, sigmas[i]), x, sigmas[i], sigmas[i + 1], cfg.noise_level,
                                  cfg.sde_kind, prev_sample=batch["x_next"][mb, j])
    return logp, mean


def training_passes(cfg, epoch, rank, n, device):
    """This rank's passes of one epoch's update, in order: (micro-batch of image indices, trained step j). The
    epoch's images form blocks of a = step_chunks(cfg) micro-batches, each permuted by (seed, epoch, block,
    ORDER); step (d, c) trains the d-th micro-batch of every block on the c-th of U / a chunks of the window:
    the same steps on any number of ranks, each rank taking its share of every step."""
    a, tbs = step_chunks(cfg), cfg.train_batch_size
    K = timesteps_per_image(cfg) if cfg.objective == "nft" else cfg.window_size  # nft: j is the j-th time
    b, first = cfg.updates_per_epoch // a, rank * n // (a * tbs)  # this rank's first block
    perms = [q * a * tbs + torch.randperm(a * tbs, generator=torch.Generator().manual_seed(
        seed_of(cfg.seed, epoch, first + q, ORDER))) for q in range(n // (a * tbs))]
    return [(p[d * tbs:(d + 1) * tbs].to(device), j) for d in range(a) for c in range(b) for p in perms
            for j in range(c * K // b, (c + 1) * K // b)]


def old_log_probs(cfg, gen, batch, passes):
    """Log-probs of the stored transitions of `passes` [(images, j)] under the current weights, computed
    exactly as the update computes them (training module, grad on, same micro-batches), then detached."""
    with no_sync(gen.train_model):
        return [step_log_prob(cfg, gen, gen.train_model, batch, mb, j)[0].detach() for mb, j in passes]


def grpo_passes(cfg, gen, batch, advantages, passes):
    """GRPO's per-pass loss: loss_of(k, images mb, trained step j) -> (clipped surrogate, info, the step's
    mean under θ, base(model) -> that mean under `model`: what the β-KL compares).

    The old log-probs (π_θold) are recomputed, by the very computation the update uses: the same module,
    micro-batches and grad mode. The sampler's log-probs would do in exact arithmetic, but under bf16 +
    torch.compile the sampling graph (no grad) and the training graph round differently: measured |log
    ratio| ~ 2e-4 at unchanged weights, so with ε = 1e-5 every sample would start out clipped. Passes of the
    first optimizer step use their own forward (the weights are unchanged until it); the later ones are
    recomputed here, before any step: (U-1)/U extra forwards for U = updates_per_epoch."""
    accum = len(passes) // cfg.updates_per_epoch
    old_logp = [None] * accum + old_log_probs(cfg, gen, batch, passes[accum:])

    def loss_of(k, mb, j):
        logp, mean = step_log_prob(cfg, gen, gen.train_model, batch, mb, j)
        old = logp.detach() if old_logp[k] is None else old_logp[k]
        loss, info = grpo_loss(logp, old, advantages[mb], cfg.clip_range, cfg.adv_clip)
        # how far the sampler's own log-probs were from these (rounding only: 0 in float32 eager)
        info["sampler_logp_gap"] = (old - batch["log_probs"][mb, j]).abs().max().item()
        return loss, info, mean, lambda model: step_log_prob(cfg, gen, model, batch, mb, j)[1]
    return loss_of, lambda counters: {}


def train_generator(cfg, epoch, gen, batch, advantages, counters, rank=0, progress=True):
    """One epoch's generator update, `updates_per_epoch` optimizer steps over this rank's passes (a
    micro-batch of images × a trained step or time, training_passes), the same loop for both objectives:
    gradients accumulate (DDP all-reduces only on the last pass before a step), the β-KL to the frozen base
    is added, each step is optimizer_step's (clip, step, EMA; a non-finite one skipped). Only the per-pass
    loss is the objective's: GRPO's clipped ratio on the window's log-probs (grpo_passes), or DiffusionNFT's
    flow matching on the clean latents (nft.passes), with what each does once the epoch is over."""
    model = gen.train_model
    passes = training_passes(cfg, epoch, rank, len(advantages), gen.device)
    accum = len(passes) // cfg.updates_per_epoch
    stats, bad = [], 0
    model.train()
    loss_of, finish = (nft.passes(cfg, epoch, rank, gen, batch, advantages, passes) if cfg.objective == "nft"
                       else grpo_passes(cfg, gen, batch, advantages, passes))
    for k, (mb, j) in enumerate(tqdm(passes, desc=f"epoch {epoch} training", leave=False,
                                     disable=None if progress else True)):
        sync = (k + 1) % accum == 0
        with contextlib.nullcontext() if sync else no_sync(model):
            loss, info, pred, base = loss_of(k, mb, j)
            if cfg.beta_kl > 0:  # β·mean((prediction under θ − under the frozen base)²)
                with torch.no_grad(), M.adapters_disabled(gen.transformer):
                    ref = base(gen.transformer)
                kl = ((pred - ref) ** 2).mean()
                loss = loss + cfg.beta_kl * kl
                info["kl"] = kl.item()
            (loss / accum).backward()
        info["loss"] = loss.item()
        stats.append(info)
        if sync:
            bad += not optimizer_step(cfg, epoch, gen, counters, rank)
    model.eval()
    out = {k: float((np.max if k == "sampler_logp_gap" else np.mean)([s[k] for s in stats]))
           for k in stats[0]}
    return {**out, "skipped_updates": bad, **finish(counters)}


def optimizer_step(cfg, epoch, gen, counters, rank=0):
    """One generator step on the accumulated gradients: clip (the norm of all-reduced gradients, so every
    rank decides alike), step (lr halved every lr_half_life steps when set), EMA; a non-finite norm skips
    the step (count_update). True if taken."""
    gnorm = torch.nn.utils.clip_grad_norm_(list(gen.params.values()), cfg.max_grad_norm)
    ok = bool(torch.isfinite(gnorm))
    if ok:
        for group in gen.opt.param_groups if cfg.lr_half_life else ():   # off: the lr is left alone
            group["lr"] = cfg.lr * 0.5 ** (counters["g_steps"] / cfg.lr_half_life)
        gen.opt.step()
        counters["g_steps"] += 1
        gen.ema.update(gen.params, counters["g_steps"])
    count_update(cfg, counters, ok, rank == 0, f"epoch {epoch}: non-finite gradient norm, step skipped")
    gen.opt.zero_grad(set_to_none=True)
    return ok


def count_update(cfg, counters, ok, master, msg):
    """The one count of non-finite updates in a row (epochs skipped, optimizer steps skipped): a finite one
    resets it; a non-finite one is said, and max_bad_updates in a row stop the run (no checkpoint)."""
    if ok:
        counters["bad_updates"] = 0
        return
    counters["bad_updates"] += 1
    if master:
        print(f"WARNING {msg} ({counters['bad_updates']} in a row)", flush=True)
    if counters["bad_updates"] >= cfg.max_bad_updates:
        raise SystemExit(f"{cfg.max_bad_updates} non-finite updates in a row: stopping without writing a "
                         "checkpoint. Check the reward for NaN/inf, or lower lr.")


# -----------------------------------------------------------------------------------------------
# 7. Logging

def final_evaluation(cfg, evaluate, history, since_eval, counters, log):
    """After the last epoch: the trained model's held-out evaluation, logged as epoch = cfg.epochs and
    watched by the monitor like the others, then eval.report (curves.png, summary.json). `log`: rank 0's
    metrics file, None on the other ranks (which only take part in the evaluation's barrier)."""
    if not cfg.eval_every:
        return
    final = dict(epoch=cfg.epochs, **evaluate(cfg.epochs, history))
    if log is not None:
        E.monitor(history, since_eval, since_eval[-1][1] if since_eval else None, final)
        log.write(final)
        # a full disk: one line
        O.guarded(os.path.join(cfg.out_dir, "curves.png and summary.json"), cfg.out_dir,
                  lambda: E.report(cfg.out_dir, counters["g_steps"]))


def epoch_stats(cfg, epoch, info, all_rewards, counters, t0, device):
    """What one epoch logs: `info` averaged over ranks, reward statistics, counters, time and memory."""
    stats = all_mean(info, device)
    r = all_rewards.cpu().double().numpy().reshape(-1, cfg.group_size)
    stats.update(epoch=epoch, epochs=cfg.epochs, updates_per_epoch=cfg.updates_per_epoch,
                 reward_mean=float(r.mean()), reward_std=float(r.std()),
                 zero_std_groups=float((r.std(1) < 1e-8).mean()), seconds=time.time() - t0,
                 images_per_s=len(all_rewards) / (time.time() - t0), **counters)
    if device.type == "cuda":  # this rank's peak since start-up (torch.cuda.max_memory_allocated)
        stats["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return stats


# -----------------------------------------------------------------------------------------------
# The run

def check_inputs(cfg, world, master=True):
    """Everything the user gave us, checked before the (slow) model load, so a mistake costs seconds.
    Returns (training prompts, held-out prompts, references or None, checkpoint to resume from or None)."""
    if cfg.init_lora:  # its rank, alpha and targets become the run's (before config.json is written)
        M.adopt_lora(cfg, master)
    validate(cfg, world, warn=print if master else None)  # refuses in one line, or warns
    bad, warnings = R.check_config(cfg, world)            # what only the rewards know
    if bad:
        raise SystemExit(f"config error: {bad}")
    for line in warnings if master else ():
        print(f"WARNING {line}", flush=True)
    missing = archs.missing_weights(cfg) + R.missing_weights(cfg)
    prompts, test_prompts, references = [], [], None
    try:
        prompts = data.load_prompts(cfg.train_prompts)
    except ValueError as e:
        missing.insert(0, str(e))
    try:
        test_prompts = [p["prompt"] for p in data.load_prompts(cfg.test_prompts)] if cfg.eval_every else []
    except ValueError as e:
        missing.append(f"held-out prompts (test_prompts; eval_every=0 turns the evaluation off): {e}")
    test_prompts = test_prompts[:cfg.eval_max_prompts or None]
    try:  # only when a chosen reward (or the adversary) names them
        references = data.load_references(cfg, prompts) if "references" in R.needs(cfg.reward) else None
    except ValueError as e:
        missing.append(f"reference images: {e}")
    if references is not None and master and references.fewest() < cfg.group_size:  # e.g. 4 style images
        print(f"references: as few as {references.fewest()} for a prompt's {cfg.group_size} generations an "
              "epoch; each generation is judged against one drawn at random, with replacement", flush=True)
    if missing:
        hint = ("\n(the defaults are the paper's SD3.5-M recipe, which needs prompts, references and "
                "weights: see README. To try the method on a laptop: `make demo`.)")
        raise SystemExit("\n".join(missing) + (hint if cfg.train_prompts == Config.train_prompts else ""))
    if master:
        O.claim_out_dir(cfg)  # one run per folder; a used one is resumed or explicitly overwritten
    # --resume: the newest intact checkpoint, the keys changed since it checked; a finished run exits 0
    resume = O.resume_point(cfg, master) if cfg.resume else (None, None)  # (its path, what it holds)
    return prompts, test_prompts, references, resume


def train(cfg):
    rank, world, device = setup_distributed()
    master = rank == 0
    prompts, test_prompts, references, (resume_from, resumed) = check_inputs(cfg, world, master)
    torch.manual_seed(cfg.seed)
    gen = M.build_generator(cfg, device, world)
    # the DINO φ, built once when a reward names it: shared by the rewards, the discriminator, the evaluation
    phi = R.make_features(cfg, device) if "phi" in R.needs(cfg.reward) else None
    adversary = R.build_adversary(cfg, device, gen.transformer.config.pooled_projection_dim, phi)
    if cfg.low_mem:  # every prompt this run will see, encoded now; then the text encoders (T5: ~9 GiB) go
        gen.encode(["", *(p["prompt"] for p in prompts), *test_prompts])
        gen.encode.drop_text_encoders()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    fixed_reward = R.build_fixed_reward(cfg, device, references, phi)
    counters = dict(g_epochs=0, g_steps=0, d_steps=0, bad_updates=0,  # and the discriminator's health:
                    noisy_g_epochs=0, drift_g_epochs=0, ref_sim_smooth=None, ref_sim_best=None)
    start = C.load(resume_from, gen, adversary, counters, cfg, resumed) if resume_from else 0
    log, extra_log = None, None
    if master:  # the external logger may refuse (log_to): before config.json and metrics.jsonl are written
        extra_log = O.external_logger(cfg)
        O.announce(cfg, world, prompts, gen, resume_from, start)
        log = O.open_metrics(cfg.out_dir, start, cfg)
    held_out = functools.partial(E.evaluate, cfg, gen, phi, references, test_prompts, rank=rank,
                                 written=log.written if master else {})  # a resume: not redone

    def evaluate(epoch, history):  # a full disk while writing the held-out grid: one line
        return O.guarded(os.path.join(cfg.out_dir, "samples"), cfg.out_dir, lambda: held_out(epoch, history))
    # SIGTERM (preemption): finish the epoch, save, exit 0. The flag is all-reduced so ranks agree.
    stop = torch.zeros(1, device=device)
    signal.signal(signal.SIGTERM, lambda *_: stop.fill_(1))
    history, since_eval = [], []  # (training reward, held-out metrics) per evaluation: the hacking monitor
    t_run = None  # the ETA's clock: starts after the first epoch's evaluation
    for epoch in range(start, cfg.epochs):
        # held-out evaluation of the weights as they enter this epoch (epoch 0 = the base model)
        ev = evaluate(epoch, history) if cfg.eval_every and epoch % cfg.eval_every == 0 else {}
        t0, t_run = time.time(), t_run or time.time()  # the img/s and ETA clocks, evaluation excluded
        # 1. sample this rank's share (which prompts and images is a function of (seed, epoch, rank))
        group_of, mine = data.assign_samples(data.epoch_prompt_indices(len(prompts), cfg.prompts_per_epoch,
                                                                       epoch, cfg.seed),
                                             cfg.group_size, world, rank)
        my_prompts, window = [prompts[g] for g in group_of[mine]], window_for_epoch(cfg, epoch)
        batch = sample_epoch(cfg, epoch, gen, [p["prompt"] for p in my_prompts], range(mine.start, mine.stop),
                             window, progress=master)
        # 2. score: fixed rewards + the current adversary (its step comes in 5, on the same inputs)
        rewards, split, d_batch, info = score_epoch(cfg, epoch, rank, batch, my_prompts, fixed_reward,
                                                    adversary, references)
        # 3. advantages: rewards of all ranks, normalised within each prompt's group; how much of their
        #    spread is signal (d_signal: None without a split-half pair)
        all_rewards, groups = all_gather_cat(rewards), [prompts[g]["prompt"] for g in group_of]
        finite = all_finite(all_rewards, batch["log_probs"], device=device)
        d_signal, d_gap = reward_signal(split, groups), gap(info)
        advantages = (compute_advantages(all_rewards, groups, cfg.global_std, std=cfg.adv_std)[mine]
                      * step_scale(cfg, d_signal, d_gap))
        # 4. who trains this epoch
        d_steps, do_g = schedule(cfg, epoch, adversary, info, finite)
        version = counters["d_steps"]  # which discriminator scored this epoch (the hacking monitor's key)
        # 5. the adversary's update
        if d_steps:
            info.update(adversary.update(d_batch, d_steps))
            counters["d_steps"] += d_steps
        # 6. generator update (a non-finite epoch is skipped: count_update)
        count_update(cfg, counters, finite, master, f"epoch {epoch}: non-finite rewards/log-probs, skipped")
        if do_g:
            info.update(train_generator(cfg, epoch, gen, batch, advantages, counters, rank, progress=master))
            counters["g_epochs"] += 1
        # 7. log (an evaluation is paired with this epoch's training reward for the reward-hacking monitor)
        stats = {**epoch_stats(cfg, epoch, info, all_rewards, counters, t0, device), **ev, "window": window,
                 "eta_s": (time.time() - t_run) / (epoch + 1 - start) * (cfg.epochs - epoch - 1),
                 **({"d_gap": d_gap} if d_gap is not None else {})}
        since_eval.append((float(all_rewards.mean()), version))
        if ev:
            E.monitor(history, since_eval, version, stats)
        if d_signal is not None:
            E.watch_health(d_signal, stats.get("ref_sim"), do_g, counters, stats, master)
        if master:
            print(O.epoch_line(stats), flush=True)
            log.write(stats)
            extra_log(stats, os.path.join(cfg.out_dir, "samples", f"epoch_{epoch:06d}.png") if ev else None)
        # 8. checkpoint
        if dist.is_initialized():
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if (epoch + 1) % cfg.save_every == 0 or epoch == cfg.epochs - 1 or stop.item():
            if master:  # named by epochs done: the weights entering epoch + 1
                C.save(cfg, epoch + 1, gen, adversary, counters)
            if dist.is_initialized():
                dist.barrier()
        if stop.item():
            if master:
                print(f"SIGTERM: saved epoch_{epoch + 1:06d} ({epoch + 1} epochs done), exiting", flush=True)
            break
    if not stop.item():  # after a SIGTERM in the last epoch (or a kill in here) --resume comes back here
        final_evaluation(cfg, evaluate, history, since_eval, counters, log)
    if dist.is_initialized():
        dist.destroy_process_group()
    return gen, adversary, counters


def parse_args(argv):
    """The config of a command line: presets and --key=value (configurator.parse_args), or with --resume
    the run's saved config with the given keys on top (outputs.resume_config)."""
    cfg = configurator.parse_args(argv)
    return O.resume_config(cfg, argv) if cfg.resume else cfg


def main(argv=None):
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    M.quiet_libraries()
    try:
        train(cfg)
    except RuntimeError as e:  # a rank died mid-collective: the survivors' gloo traceback says nothing of why
        raise O.peer_stopped(e)  # (a SystemExit prints its line alone; any other error keeps its cause)


if __name__ == "__main__":
    main()
