"""
train.py — Adv-GRPO training of SD3 / SD3.5, top to bottom.

    python train.py config/tiny.py                          # one process (CPU or one GPU)
    torchrun --nproc_per_node=8 train.py config/sd35m_dino.py --lr=1e-4
    python train.py config/tiny.py --resume                 # continue from the newest checkpoint

Each epoch: sample a group of images per prompt (a short SDE "window" inside an ODE rollout) →
reward them (a discriminator on frozen DINOv2 features that keeps learning from reference images, or
a fixed reward) → group-normalised advantages across all ranks → a clipped GRPO update of the
generator (LoRA) and/or a discriminator step, per the schedule → log → checkpoint.

Owns: the config and its parser, DDP set-up, the epoch loop, the GRPO loss and advantages,
checkpoints. The maths of a denoising step lives in sampler.py, models in model.py, rewards in
reward.py, prompts and references in data.py.

Departs from the published Flow-GRPO / Adv-GRPO scripts: no accelerate (plain DDP: you can see when
gradients synchronise), no anomaly detection (3x slower), the discriminator head in float32 and
synchronised across ranks, every random stream derived from (seed, epoch, rank, image) so a run is
reproducible and a resume is exact, and the training window may start at random (`window_start =
"random"`, the paper's text) as well as at 0 (the published code).
"""

import ast
import contextlib
import dataclasses
import difflib
import json
import os
import shutil
import signal
import sys
import time
import typing
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

import data
import eval as E
import model as M
import sampler as S


# -----------------------------------------------------------------------------------------------
# Config: defaults = the paper's main setting (SD3.5-M, adversarial DINO reward). Presets in config/
# are Python files assigning some of these names; then --key=value on the command line.

@dataclass
class Config:
    # model
    pretrained: str = "stabilityai/stable-diffusion-3.5-medium"  # hub id, local folder, or random:<arch>
    t5: bool = True                   # load T5-XXL; False feeds zeros in its place (as diffusers allows)
    max_sequence_length: int | None = None  # T5 tokens; None: the pipeline folder's own (sample_settings.json), else 128
                                      # (the recipe: 77 CLIP + 128 T5 = 205 text tokens)
    resolution: int = 512
    lora_rank: int = 32               # 0 = full fine-tuning
    lora_alpha: int = 64
    gradient_checkpointing: bool = False
    compile: bool = False             # torch.compile the transformer
    low_mem: bool = False             # 24 GB GPUs: every prompt encoded once at start-up, then the text encoders
                                      # are freed and the embeddings kept on the CPU; VAE decodes 4 images at a time.
                                      # Pair with gradient_checkpointing (config/sd35m_24gb.py)
    mixed_precision: str = "bf16"     # "bf16" (frozen weights bf16, autocast; CPU too) or "no" (float32)
    # data
    train_prompts: str = "data/train.txt"       # .txt (one per line) or .jsonl with "prompt"
    test_prompts: str = "data/test.txt"
    # sampling
    num_steps: int = 10
    guidance_scale: float = 4.5       # CFG when sampling and when recomputing log-probs; 1 = off
    sde_kind: str = "cps"             # "cps" (Adv-GRPO) or "sde" (Flow-GRPO)
    noise_level: float | None = None  # a; None: by sde_kind (cps 0.8 as Adv-GRPO, sde 0.7 as Flow-GRPO)
    window_start: str = "0"           # first trained step: an integer (published: 0), or "random": drawn per epoch
                                      # from 0..N/2 inclusive (the paper's text; the published range)
    window_size: int = 2              # K trained (stochastic) steps; the rest are ODE
    # batch arithmetic (global = across all ranks)
    group_size: int = 16              # images per prompt
    prompts_per_epoch: int = 48
    sample_batch_size: int = 16       # images per sampling forward on one rank
    train_batch_size: int = 8         # images per training forward on one rank
    updates_per_epoch: int = 2        # optimizer steps per epoch; gradients accumulate in between
    # GRPO
    lr: float = 3e-4
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    clip_range: float | None = None   # ε of the ratio clip; None: by sde_kind (cps 1e-5: its log-prob is unscaled; sde 1e-4)
    adv_clip: float = 5.0
    beta_kl: float = 0.0              # KL to the frozen base, β·mean((μ_θ - μ_ref)²)
    global_std: bool = True           # normalise advantages by the std of all rewards of the epoch
    ema_decay: float = 0.9            # the EMA's decay after its warm-up: min((1 + s)/(10 + s), ema_decay) at step s
    ema_every: int = 8                # EMA update every N optimizer steps
    # reward: a weighted sum; "dino_adv" / "pickscore_adv" are learned adversarially, others fixed
    reward: dict = field(default_factory=lambda: {"dino_adv": 1.0})
    references: str = "data/references.json"  # {prompt: [relative paths]} index, or a folder (real for every prompt)
    reference_root: str = ""          # root of the index's paths (default: the JSON's folder)
    skip_bad_references: bool = False # drop unreadable reference images with a warning instead of stopping
    schedule: str = "paper"           # "paper": D-only epochs, G every d_times-th; "shared": G + D on one batch;
                                      # "frozen": D trains only during d_warmup, then stays fixed (a fixed learned reward)
    d_warmup: int = 0                 # first epochs in which only the discriminator trains
    d_times: int = 10                 # paper schedule: the generator trains on epochs where (epoch+1) % d_times == 0
    d_steps: int = 1                  # shared schedule: D steps per epoch on the same samples
    d_lr: float = 1e-4
    d_conditional: bool = False       # beyond the paper: the D head also sees the prompt (projection term on the
                                      # pooled text embedding), and references of other prompts count as fakes
    dino_backbone: str = "vit_base_patch14_dinov2.lvd142m"  # timm name, or "random:tiny" (tests)
    dino_weights: str = ""            # local weights file for the backbone (clusters without hub access)
    dino_kwargs: dict = field(default_factory=dict)  # timm.create_model architecture kwargs (tiny world)
    dino_image_size: int = 518
    pickscore_model: str = "yuvalkirstain/PickScore_v1"     # or "random:tiny" (tests)
    pickscore_processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    pickscore_train_last_k: int = 1   # vision layers the PickScore adversary trains (paper 2, published code 1)
    pickscore_lr: float = 5e-6
    clip_model: str = "openai/clip-vit-large-patch14"  # the fixed clip_score reward (hub id, folder or "random:tiny")
    # run
    epochs: int = 1000
    seed: int = 0
    out_dir: str = "out/sd35m_dino"
    save_every: int = 20              # epochs between checkpoints
    keep_last: int = 3                # checkpoints kept on disk
    resume: bool = False              # continue from the newest checkpoint in out_dir
    max_bad_updates: int = 5          # stop after this many consecutive non-finite updates
    log_to: str = ""                  # also log to "wandb" or "tensorboard" (installed separately)
    # held-out evaluation (EMA weights, ODE, fixed seeds) every eval_every epochs and at the end
    eval_every: int = 20              # 0 = never
    eval_num_steps: int = 40
    eval_guidance_scale: float = 4.5
    eval_n_per_prompt: int = 1        # images per test prompt
    eval_max_prompts: int = 64        # first N test prompts (0 = all)


# What `None` means for the keys whose default depends on another one (resolved by parse_args)
SDE_DEFAULTS = {"cps": dict(noise_level=0.8, clip_range=1e-5), "sde": dict(noise_level=0.7, clip_range=1e-4)}


def parse_args(argv):
    """Preset files (*.py, executed in order) then --key=value overrides. Refuses unknown keys and
    values of the wrong type, naming the key and where it came from."""
    cfg = Config()
    hints = typing.get_type_hints(Config)

    def set_key(key, value, where):
        if key not in hints:
            close = difflib.get_close_matches(key, hints, n=1)
            raise SystemExit(f"{where}: unknown config key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        kinds = typing.get_args(hints[key]) or (hints[key],)        # `float | None` -> (float, NoneType)
        want = kinds[0]
        if not (value is None and type(None) in kinds):
            if want is float and type(value) is int:
                value = float(value)
            if want is str and not isinstance(value, str):
                value = str(value)  # e.g. --window_start=0 parses as an int
            if type(value) is not want:
                raise SystemExit(f"{where}: {key} must be {want.__name__}, got {value!r} ({type(value).__name__})")
        setattr(cfg, key, value)

    for arg in argv:
        if arg.endswith(".py") and not arg.startswith("--"):
            ns = {}
            try:
                exec(compile(open(arg).read(), arg, "exec"), ns)
            except FileNotFoundError:
                raise SystemExit(f"preset file not found: {arg}")
            for k, v in ns.items():
                if not k.startswith("_") and not callable(v) and not isinstance(v, type(sys)):
                    set_key(k, v, arg)
        elif arg.startswith("--"):
            key, eq, raw = arg[2:].partition("=")
            if not eq:
                raw = "True"  # a bare --flag
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw  # a plain string
            set_key(key, value, "command line")
        else:
            raise SystemExit(f"unexpected argument {arg!r}: give preset files (*.py) and --key=value")
    return resolve_defaults(cfg)


def resolve_defaults(cfg):
    """Fill in the keys left None: noise_level / clip_range by sde_kind, max_sequence_length from the
    pipeline folder's sample_settings.json (else 128). A value that contradicts the pipeline's settings
    is refused: it would sample garbage without an error."""
    for key, value in SDE_DEFAULTS.get(cfg.sde_kind, {}).items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    for key, value in M.pipeline_settings(cfg.pretrained).items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
        elif getattr(cfg, key) != value:
            raise SystemExit(f"config error: {cfg.pretrained} was trained with {key} = {value} "
                             f"({M.SETTINGS_FILE}); {key} = {getattr(cfg, key)} would sample garbage")
    if cfg.max_sequence_length is None:
        cfg.max_sequence_length = 128
    return cfg


def validate(cfg, world):
    """Batch arithmetic and choices that would otherwise fail deep inside (or train on garbage)."""
    n_global = cfg.prompts_per_epoch * cfg.group_size
    checks = [
        (n_global % world == 0, f"prompts_per_epoch × group_size = {n_global} images must split evenly over "
                                f"{world} ranks"),
        ((n_global // world) % cfg.sample_batch_size == 0, f"images per rank ({n_global // world}) must be a "
                                f"multiple of sample_batch_size ({cfg.sample_batch_size})"),
        ((n_global // world) % cfg.train_batch_size == 0, f"images per rank ({n_global // world}) must be a "
                                f"multiple of train_batch_size ({cfg.train_batch_size})"),
        ((n_global // world // cfg.train_batch_size * cfg.window_size) % cfg.updates_per_epoch == 0,
         f"backward passes per epoch ({n_global // world // cfg.train_batch_size} batches × {cfg.window_size} "
         f"steps) must be a multiple of updates_per_epoch ({cfg.updates_per_epoch})"),
        (cfg.sde_kind in SDE_DEFAULTS, f"sde_kind must be one of {sorted(SDE_DEFAULTS)} for training (\"ode\" has "
                                        "no noise, hence no log-probability to train on), got {cfg.sde_kind!r}"),
        (cfg.window_start == "random" or cfg.window_start.isdigit(), "window_start must be an integer or 'random'"),
        (1 <= cfg.window_size <= cfg.num_steps, f"window_size must be in 1..num_steps ({cfg.num_steps}), "
                                                f"got {cfg.window_size}"),
        (not cfg.window_start.isdigit() or int(cfg.window_start) + cfg.window_size <= cfg.num_steps,
         f"the training window [{cfg.window_start}, {cfg.window_start}+{cfg.window_size}) does not fit in "
         f"num_steps = {cfg.num_steps} steps"),
        (cfg.noise_level is not None and cfg.clip_range is not None, "noise_level and clip_range must be set "
                                                                      "(parse_args fills them in from sde_kind)"),
        (cfg.mixed_precision in ("bf16", "no"), "mixed_precision must be 'bf16' or 'no'"),
        (cfg.group_size >= 2, "group_size must be ≥ 2: a group of one has no advantage"),
        (cfg.schedule in ("paper", "shared", "frozen"), "schedule must be 'paper', 'shared' or 'frozen'"),
        (sum(k in ("dino_adv", "pickscore_adv") for k in cfg.reward) <= 1, "at most one adversarial reward"),
        (not cfg.d_conditional or "dino_adv" in cfg.reward, "d_conditional needs the dino_adv reward"),
        (cfg.beta_kl == 0 or cfg.lora_rank > 0, "beta_kl > 0 needs LoRA (the frozen base is the adapter switched off)"),
    ]
    for ok, msg in checks:
        if not ok:
            raise SystemExit(f"config error: {msg}")


# -----------------------------------------------------------------------------------------------
# GRPO maths: small pure functions (unit-tested)

def compute_advantages(rewards, group_ids, global_std=False, eps=1e-4):
    """A = (r - mean_group) / (std + eps), std of the group or (global_std) of all rewards.

    `group_ids` are any hashables (prompt strings, prompt indices). Works on numpy arrays and torch
    tensors, returning the same type. std is the population std (ddof = 0), as in Flow-GRPO."""
    is_torch = torch.is_tensor(rewards)
    r = rewards.detach().double().cpu().numpy() if is_torch else np.asarray(rewards, dtype=np.float64)
    adv = np.zeros_like(r)
    index = {}
    keys = np.array([index.setdefault(g, len(index)) for g in group_ids])
    std_all = r.std()
    for k in range(len(index)):
        m = keys == k
        std = std_all if global_std else r[m].std()
        adv[m] = (r[m] - r[m].mean()) / (std + eps)
    return torch.as_tensor(adv, dtype=rewards.dtype, device=rewards.device) if is_torch else adv.astype(r.dtype)


def grpo_loss(log_prob, old_log_prob, advantages, clip_range, adv_clip):
    """The clipped surrogate: mean(max(-A·ratio, -A·clip(ratio, 1±ε))), advantages clipped to ±adv_clip."""
    adv = advantages.clamp(-adv_clip, adv_clip)
    ratio = torch.exp(log_prob - old_log_prob)
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
    info = dict(clipfrac=((ratio - 1).abs() > clip_range).float().mean().item(),
                approx_kl=0.5 * ((log_prob - old_log_prob) ** 2).mean().item(),
                ratio=ratio.mean().item())
    return loss, info


def window_for_epoch(cfg, epoch):
    """Start of the trained window: fixed, or drawn from the first half of the steps — from (seed,
    epoch) alone, so every rank draws the same window with no communication."""
    if cfg.window_start != "random":
        return int(cfg.window_start)
    # 0..N/2 inclusive, as the published code draws it (random.randint(0, N // 2)): N = 10 gives 0..5, so
    # the window always covers part of the high-noise half. Capped so the window fits (N - K).
    # The published code reseeds Python's RNG with the rank before each draw, so every epoch of a rank
    # trains the same window; here it is drawn per epoch, the same on every rank.
    hi = min(cfg.num_steps // 2, cfg.num_steps - cfg.window_size)
    return int(np.random.default_rng([cfg.seed, epoch, 7]).integers(0, hi + 1))


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
    """Average a dict of floats over ranks (for logging only)."""
    if not dist.is_initialized() or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, (t / dist.get_world_size()).tolist()))


# -----------------------------------------------------------------------------------------------
# Sampling: this rank's share of the epoch's images, with the trajectories needed to train on them

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
def sample_epoch(cfg, epoch, ctx, prompts, global_indices, window_start):
    """Roll out every image of this rank. Returns a dict of per-image tensors on the device."""
    pipe, device = ctx["pipe"], ctx["device"]
    neg_emb, neg_pool = ctx["encode"]([""])
    shape = M.latent_shape(pipe, cfg.resolution)
    sigmas = ctx["sigmas"]
    out = []
    bs = cfg.sample_batch_size
    for b in ctx["tqdm"](range(0, len(prompts), bs), desc=f"epoch {epoch} sampling", leave=False):
        p, idx = prompts[b:b + bs], global_indices[b:b + bs]
        emb, pool = ctx["encode"](p)
        noise, step_noise = per_image_noise(cfg, epoch, idx, shape, cfg.window_size)
        vel = S.make_velocity_fn(ctx["fast_model"], emb, pool, neg_emb.expand_as(emb), neg_pool.expand_as(pool),
                                 cfg.guidance_scale, ctx["autocast"])
        r = S.rollout(vel, noise.to(device), sigmas, cfg.sde_kind, cfg.noise_level, window_start, cfg.window_size,
                      step_noise=step_noise.to(device), decode_fn=ctx["decode"])
        out.append(dict(images=r["images"], x=r["x"], x_next=r["x_next"], log_probs=r["log_probs"],
                        emb=emb, pool=pool))
    batch = {k: torch.cat([o[k] for o in out]) for k in out[0]}
    batch["step_idx"] = r["step_idx"]
    return batch


# -----------------------------------------------------------------------------------------------
# The adversarial reward: scores from the current discriminator, and the D steps the schedule asks for

def build_adversary(cfg, device, cond_dim=0):
    """(kind, model) for the adversarial reward named in cfg.reward, or (None, None). `cond_dim`: the
    pooled text embedding's width, for cfg.d_conditional."""
    import reward as R
    kind = next((k for k in cfg.reward if k in R.ADVERSARIAL), None)
    if kind == "dino_adv":
        backbone = R.make_backbone(cfg.dino_backbone, cfg.dino_image_size, cfg.dino_weights, cfg.dino_kwargs)
        adv = R.DinoDiscriminator(backbone, image_size=cfg.dino_image_size, lr=cfg.d_lr, seed=cfg.seed,
                                  cond_dim=cond_dim if cfg.d_conditional else 0).to(device)
        if cfg.mixed_precision == "bf16":
            adv.phi.backbone.to(torch.bfloat16)   # φ frozen in bf16; the head stays float32
    elif kind == "pickscore_adv":
        model, tok = R.load_clip(cfg.pickscore_model, cfg.pickscore_processor)
        adv = R.PickScoreAdversary(model, tok, cfg.pickscore_train_last_k, cfg.pickscore_lr).to(device)
    else:
        return None, None
    return kind, adv


def load_references(cfg, prompts):
    """The "real" images, validated at start-up: every training prompt must have references."""
    if os.path.isdir(cfg.references):
        refs = data.ReferenceSet.from_folder(cfg.references, size=cfg.resolution, skip_bad=cfg.skip_bad_references)
    else:
        refs = data.ReferenceSet.from_index(cfg.references, cfg.reference_root or None, size=cfg.resolution,
                                           skip_bad=cfg.skip_bad_references)
    if cfg.d_conditional and refs.folder_mode:
        raise SystemExit("config error: d_conditional needs references per prompt (an index): in a folder every "
                         "image is real for every prompt, so there is no 'wrong prompt'")
    missing = refs.missing([p["prompt"] for p in prompts])
    if missing:
        raise SystemExit(f"{len(missing)} of {len(prompts)} training prompts have no reference images in "
                         f"{cfg.references}, e.g. {missing[:3]}. Add references or remove these prompts.")
    return refs


def adversarial_epoch(cfg, epoch, ctx, batch, prompts):
    """Rewards (n,) of this rank's generations from the current discriminator, after taking the D
    step(s) that the schedule asks for this epoch (D only ever sees the features computed here, so the
    backbone runs once per image per epoch). Returns (rewards, train_generator?, info)."""
    kind, adv, device, images = ctx["adv_kind"], ctx["adversary"], ctx["device"], batch["images"]
    # A non-finite generation must not reach the discriminator (it would poison the head for good).
    if all_mean({"ok": float(torch.isfinite(images).all())}, device)["ok"] < 1:
        return torch.full((len(images),), float("nan"), device=device), False, {}
    g = torch.Generator(device).manual_seed(seed_of(cfg.seed, epoch, ctx["rank"], 1))   # patch draws
    real_images = ctx["references"].sample(prompts, 1, torch.Generator().manual_seed(seed_of(cfg.seed, epoch, ctx["rank"], 2)))
    real_images = real_images.to(device)                                                # (n, 3, H, W)
    if kind == "dino_adv":
        fake, real = adv.features(images), adv.features(real_images)                    # φ: once per image
        wrong = None
        if cfg.d_conditional:  # each image with its prompt's text embedding; reals paired with the next group's
            fake, real = (*fake, batch["pool"]), (*real, batch["pool"])
            other = torch.arange(len(prompts)).roll(-cfg.group_size)                    # a different prompt, mostly
            keep = torch.tensor([prompts[i] != prompts[j] for i, j in enumerate(other.tolist())])
            wrong = (real[0][other[keep]], batch["pool"][keep.to(device)])
        rewards = adv.score(*fake, generator=g)
        with torch.no_grad():
            _, info = adv.d_loss_from_features(real, fake, generator=g, wrong=wrong)    # before any D step
        if epoch < cfg.d_warmup:
            do_d, do_g = True, False
        elif cfg.schedule == "paper":
            do_d = (epoch + 1) % cfg.d_times != 0
            do_g = not do_d
        else:  # shared: both, on the same samples; frozen: the generator alone, against a fixed D
            do_d, do_g = cfg.schedule == "shared", True
        for _ in range(cfg.d_steps if do_d else 0):
            d = adv.d_step(real, fake, generator=g, wrong=wrong)
            ctx["counters"]["d_steps"] += 1
            info["d_loss"] = d["d_loss"]
    else:  # pickscore_adv: the trigger rule, on means over all ranks
        rewards, ref_rewards = adv.reward(images, prompts), adv.reward(real_images, prompts)
        means = all_mean(dict(gen=rewards.mean().item(), ref=ref_rewards.mean().item()), device)
        info = dict(d_real=means["ref"], d_fake=means["gen"], d_acc=(ref_rewards > rewards).float().mean().item())
        do_d = adv.should_train_d(means["gen"], means["ref"])
        do_g = not do_d
        if do_d:
            info.update(adv.d_step(real_images, images, prompts))
            ctx["counters"]["d_steps"] += 1
    return rewards.float(), do_g, info


def seed_of(*keys):
    """A 63-bit seed from a tuple of ints: independent random streams per (seed, epoch, rank, purpose)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> 1)


# -----------------------------------------------------------------------------------------------
# The generator update

def step_log_prob(cfg, ctx, model, batch, mb, j):
    """Log-prob (B,) and mean of the stored transition x_j → x_{j+1} of images `mb` under `model`
    (the same CFG and step kind as sampling, so with unchanged weights it equals the old log-prob)."""
    neg_emb, neg_pool = ctx["encode"]([""])
    emb, pool = batch["emb"][mb], batch["pool"][mb]
    i, sigmas = int(batch["step_idx"][j]), ctx["sigmas"]
    vel = S.make_velocity_fn(model, emb, pool, neg_emb.expand_as(emb), neg_pool.expand_as(pool),
                             cfg.guidance_scale, ctx["autocast"])
    x = batch["x"][mb, j]
    _, logp, mean, _ = S.sde_step(vel(x, sigmas[i]), x, sigmas[i], sigmas[i + 1], cfg.noise_level, cfg.sde_kind,
                                  prev_sample=batch["x_next"][mb, j])
    return logp, mean


def old_log_probs(cfg, ctx, batch, passes):
    """Log-probs of the stored transitions of `passes` [(images, j)] under the current weights, computed
    exactly as the update computes them (training module, grad on, same micro-batches), then detached."""
    with no_sync(ctx["ddp_model"], ctx["world"]):
        return [step_log_prob(cfg, ctx, ctx["ddp_model"], batch, mb, j)[0].detach() for mb, j in passes]


def no_sync(model, world):
    """DDP's no_sync (no gradient all-reduce in this backward) when there is more than one rank."""
    return model.no_sync() if world > 1 else contextlib.nullcontext()


def train_generator(cfg, epoch, ctx, batch, advantages):
    """One pass of clipped-GRPO over this rank's images, `updates_per_epoch` optimizer steps.

    For each micro-batch of images and each trained step j, recompute the log-prob of the stored
    transition x_j → x_{j+1} under the current weights (same CFG as sampling), accumulate gradients
    (DDP all-reduces only on the last micro-step before an optimizer step), clip, step, EMA."""
    model, params, opt, device = ctx["ddp_model"], ctx["params"], ctx["opt"], ctx["device"]
    n = len(advantages)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed_of(cfg.seed, epoch, ctx["rank"], 3)))
    micro = [order[i:i + cfg.train_batch_size] for i in range(0, n, cfg.train_batch_size)]
    passes = [(mb.to(device), j) for mb in micro for j in range(len(batch["step_idx"]))]
    accum = len(passes) // cfg.updates_per_epoch
    stats, bad = [], 0
    model.train()
    # The old log-probs (π_θold) are recomputed here, by the very computation the update uses: the same
    # module, micro-batches and grad mode. The sampler's log-probs would do in exact arithmetic, but under
    # bf16 + torch.compile the sampling graph (no grad) and the training graph round differently: measured
    # |log ratio| ~ 2e-4 at unchanged weights, so with ε = 1e-5 every sample would start out clipped.
    # Passes of the first optimizer step use their own forward (weights are unchanged until it); the later
    # ones are recomputed now, before any step: (U-1)/U extra forwards for U = updates_per_epoch.
    old_logp = [None] * accum + old_log_probs(cfg, ctx, batch, passes[accum:])
    for k, (mb, j) in enumerate(ctx["tqdm"](passes, desc=f"epoch {epoch} training", leave=False)):
        sync = (k + 1) % accum == 0
        with contextlib.nullcontext() if sync else no_sync(model, ctx["world"]):
            logp, mean = step_log_prob(cfg, ctx, model, batch, mb, j)
            old = logp.detach() if k < accum else old_logp[k]
            loss, info = grpo_loss(logp, old, advantages[mb], cfg.clip_range, cfg.adv_clip)
            # how far the sampler's own log-probs were from these (rounding only: 0 in float32 eager)
            info["sampler_logp_gap"] = (old - batch["log_probs"][mb, j]).abs().max().item()
            if cfg.beta_kl > 0:
                with torch.no_grad(), M.adapters_disabled(ctx["transformer"]):
                    _, mean_ref = step_log_prob(cfg, ctx, ctx["transformer"], batch, mb, j)
                kl = ((mean - mean_ref) ** 2).mean()
                loss = loss + cfg.beta_kl * kl
                info["kl"] = kl.item()
            (loss / accum).backward()
        info["loss"] = loss.item()
        stats.append(info)
        if sync:
            # The norm is computed on all-reduced gradients, so every rank takes the same decision.
            gnorm = torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
            if torch.isfinite(gnorm):
                opt.step()
                ctx["counters"]["g_steps"] += 1
                ctx["ema"].update(params, ctx["counters"]["g_steps"])
                ctx["counters"]["bad_updates"] = 0
            else:
                bad += 1
                note_bad_update(cfg, ctx, ctx["rank"] == 0, f"epoch {epoch}: non-finite gradient norm, step skipped")
            opt.zero_grad(set_to_none=True)
    model.eval()
    out = {k: float((np.max if k == "sampler_logp_gap" else np.mean)([s[k] for s in stats])) for k in stats[0]}
    out["skipped_updates"] = bad
    return out


# -----------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary folder, then renamed (atomic); the newest complete one resumes

def save_checkpoint(cfg, ctx, epoch):
    from safetensors.torch import save_file
    root = os.path.join(cfg.out_dir, "checkpoints")
    final = os.path.join(root, f"epoch_{epoch:06d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    params = ctx["params"]
    tensors = {n: p.detach().float().cpu().contiguous() for n, p in params.items()}
    if not all(torch.isfinite(t).all() for t in tensors.values()):
        raise SystemExit(f"refusing to write a non-finite checkpoint at epoch {epoch}")
    save_file(tensors, os.path.join(tmp, "trainable.safetensors"))
    save_file({n: t.cpu().contiguous() for n, t in ctx["ema"].state_dict().items()}, os.path.join(tmp, "ema.safetensors"))
    state = dict(epoch=epoch, counters=dict(ctx["counters"]), config=dataclasses.asdict(cfg),
                 optimizer=ctx["opt"].state_dict(), rng_cpu=torch.get_rng_state())
    if ctx.get("adversary") is not None:
        state["adversary"] = ctx["adversary"].head_state()
    torch.save(state, os.path.join(tmp, "state.pt"))
    if cfg.lora_rank > 0:
        export_lora(ctx, os.path.join(tmp, "lora"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1)
    for dirpath, _, files in os.walk(tmp):  # flush file contents before the rename makes them visible
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    fd = os.open(root, os.O_RDONLY)  # make the rename itself durable
    os.fsync(fd)
    os.close(fd)
    done = sorted(d for d in os.listdir(root) if d.startswith("epoch_") and not d.endswith(".tmp"))
    for old in done[:-cfg.keep_last]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def export_lora(ctx, path):
    """The EMA LoRA in diffusers' format: `StableDiffusion3Pipeline.from_pretrained(base)
    .load_lora_weights(path)` then samples what our eval samples (a test checks it)."""
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict
    tr = ctx["transformer"]
    with ctx["ema"].applied(ctx["params"]):
        layers = {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(tr).items()}
    # the metadata carries lora_alpha: without it diffusers assumes alpha = rank (a 2x wrong scale here)
    StableDiffusion3Pipeline.save_lora_weights(path, transformer_lora_layers=layers,
                                               transformer_lora_adapter_metadata=tr.peft_config["default"].to_dict())


def latest_checkpoint(out_dir):
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return None
    done = sorted(d for d in os.listdir(root) if d.startswith("epoch_") and not d.endswith(".tmp"))
    return os.path.join(root, done[-1]) if done else None


def load_checkpoint(path, ctx):
    from safetensors.torch import load_file
    trainable, ema = load_file(os.path.join(path, "trainable.safetensors")), load_file(os.path.join(path, "ema.safetensors"))
    with torch.no_grad():
        for n, p in ctx["params"].items():
            p.copy_(trainable[n])
    ctx["ema"].load_state_dict(ema)
    state = torch.load(os.path.join(path, "state.pt"), weights_only=True, map_location=ctx["device"])
    ctx["opt"].load_state_dict(state["optimizer"])
    ctx["counters"].update(state["counters"])
    torch.set_rng_state(state["rng_cpu"].cpu())
    if ctx.get("adversary") is not None and "adversary" in state:
        ctx["adversary"].load_head_state(state["adversary"])
    return state["epoch"]


# -----------------------------------------------------------------------------------------------

def build(cfg, device, rank, world):
    """Pipeline, trainable parameters, optimizer, EMA, prompt encoder, DDP wrapper."""
    cuda = device.type == "cuda"
    bf16 = cfg.mixed_precision == "bf16"
    # Frozen weights in bf16 (memory), trainable ones float32 (Adam needs the precision). The CPU honours
    # bf16 too (autocast works there), so the bf16 path users run on GPUs is testable without one.
    pipe = M.load_pipeline(cfg.pretrained, t5=cfg.t5, device=device, dtype=torch.bfloat16 if bf16 else torch.float32)
    for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        if m is not None:
            m.requires_grad_(False).eval()
    f = M.vae_factor(pipe) * pipe.transformer.config.patch_size
    if cfg.resolution % f:
        raise SystemExit(f"config error: resolution {cfg.resolution} must be a multiple of {f} "
                         f"(VAE factor × patch size of {cfg.pretrained})")
    transformer = M.add_lora(pipe.transformer, cfg.lora_rank, cfg.lora_alpha)
    params = M.trainable_parameters(transformer)
    for p in params.values():
        p.data = p.data.float()
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.eval()
    ddp_model = transformer
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(transformer, device_ids=[device.index] if cuda else None)
    fast_model = transformer  # what sampling and evaluation call (no grad, no DDP)
    if cfg.compile:
        # dynamic=False: a handful of batch shapes (sampling, training, eval), each compiled static, since
        # kernels specialised to the shape are faster than the dynamic-shape ones dynamo would switch to
        fast_model, ddp_model = torch.compile(transformer, dynamic=False), torch.compile(ddp_model, dynamic=False)
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    from tqdm.auto import tqdm
    return dict(
        pipe=pipe, transformer=transformer, ddp_model=ddp_model, fast_model=fast_model, params=params, opt=opt, device=device,
        world=world, rank=rank, ema=M.EMA(params, cfg.ema_decay, cfg.ema_every),
        encode=M.PromptEncoder(pipe, device, cfg.max_sequence_length, cache_device="cpu" if cfg.low_mem else device),
        decode=lambda z: S.decode_latents(pipe.vae, z, chunk=4 if cfg.low_mem else 16),
        sigmas=S.flow_sigmas(pipe.scheduler, cfg.num_steps, device),
        autocast=torch.bfloat16 if bf16 else None, resolution=cfg.resolution,
        counters=dict(g_epochs=0, g_steps=0, d_steps=0, bad_updates=0),
        tqdm=lambda it, **kw: tqdm(it, disable=rank != 0, **kw),
    )


def check_inputs(cfg, world):
    """Everything the user gave us, checked before the (slow) model load, so a mistake costs seconds.
    Returns (training prompts, held-out prompts, references or None, checkpoint to resume from or None)."""
    import reward as R
    validate(cfg, world)
    try:
        prompts = data.load_prompts(cfg.train_prompts)
    except ValueError as e:
        raise SystemExit(f"{e}\n(the defaults are the paper's SD3.5-M recipe, which needs prompts, references and "
                         "weights: see README. To try the method on a laptop: `make demo`.)") from None
    try:
        test_prompts = load_test_prompts(cfg) if cfg.eval_every else []
    except ValueError as e:
        raise SystemExit(f"held-out prompts (test_prompts; eval_every=0 turns the evaluation off): {e}") from None
    unknown = [k for k in cfg.reward if k not in R.REWARDS and k not in R.ADVERSARIAL]
    if unknown:
        raise SystemExit(f"config error: unknown reward {unknown[0]!r}; known: {sorted(R.REWARDS) + list(R.ADVERSARIAL)}")
    needs_refs = any(k in cfg.reward for k in (*R.ADVERSARIAL, "dino_sim"))
    try:
        references = load_references(cfg, prompts) if needs_refs else None
    except ValueError as e:
        raise SystemExit(f"reference images: {e}") from None
    resume_from = None
    if cfg.resume:
        resume_from = latest_checkpoint(cfg.out_dir)
        if resume_from is None:
            raise SystemExit(f"--resume: no complete checkpoint in {cfg.out_dir}/checkpoints")
    return prompts, test_prompts, references, resume_from


def build_fixed_reward(cfg, ctx):
    """The weighted sum of the fixed (not adversarial) rewards in cfg.reward, or None."""
    import reward as R
    fixed = {k: w for k, w in cfg.reward.items() if k not in R.ADVERSARIAL}
    if not fixed:
        return None
    extra = {}
    if "dino_sim" in fixed:  # the same frozen backbone as the discriminator's (or as configured)
        extra["backbone"] = ctx["adversary"].phi if ctx["adv_kind"] == "dino_adv" else R.DinoFeatures(
            R.make_backbone(cfg.dino_backbone, cfg.dino_image_size, cfg.dino_weights, cfg.dino_kwargs),
            cfg.dino_image_size).to(ctx["device"])
    return R.build_reward(fixed, device=ctx["device"], references=ctx["references"], clip_model=cfg.clip_model,
                          pickscore_model=cfg.pickscore_model, pickscore_processor=cfg.pickscore_processor, **extra)


def train(cfg):
    rank, world, device = setup_distributed()
    master = rank == 0
    prompts, test_prompts, references, resume_from = check_inputs(cfg, world)

    # --- models ---
    torch.manual_seed(cfg.seed)
    ctx = build(cfg, device, rank, world)
    ctx["adv_kind"], ctx["adversary"] = build_adversary(cfg, device, ctx["pipe"].transformer.config.pooled_projection_dim)
    ctx["references"] = references
    if cfg.low_mem:  # every prompt this run will see, encoded now; then the text encoders (T5: ~9 GiB) go
        ctx["encode"](["", *(p["prompt"] for p in prompts), *test_prompts])
        ctx["encode"].drop_text_encoders()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    reward_fn = build_fixed_reward(cfg, ctx)
    start = load_checkpoint(resume_from, ctx) + 1 if resume_from else 0
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        print(json.dumps(dataclasses.asdict(cfg), indent=1))
        if resume_from:
            print(f"resumed from {resume_from} (next epoch {start})")
        n = cfg.prompts_per_epoch * cfg.group_size
        print(f"world {world} | {cfg.prompts_per_epoch} prompts × {cfg.group_size} images = {n} images/epoch "
              f"({n // world} per rank) | {len(prompts)} training prompts | trainable params "
              f"{sum(p.numel() for p in ctx['params'].values()):,} of {M.count_params(ctx['transformer']):,}")
        log = open_metrics(cfg.out_dir, start)
        extra_log = external_logger(cfg)
    # SIGTERM (preemption): finish the epoch, save, exit 0. The flag is all-reduced so ranks agree.
    stop = torch.zeros(1, device=device)
    signal.signal(signal.SIGTERM, lambda *_: stop.fill_(1))

    history = []  # (training reward, held-out metrics) per evaluation, for the reward-hacking monitor
    for epoch in range(start, cfg.epochs):
        t0 = time.time()
        # 0. held-out evaluation of the weights as they enter this epoch (epoch 0 = the base model)
        ev = E.evaluate(cfg, ctx, test_prompts, epoch, history) if cfg.eval_every and epoch % cfg.eval_every == 0 else {}
        # 1. which prompts, which images on this rank (identical on every rank, no communication)
        pidx = data.epoch_prompt_indices(len(prompts), cfg.prompts_per_epoch, epoch, cfg.seed)
        group_of, mine = data.assign_samples(pidx, cfg.group_size, world, rank)
        my_prompts = [prompts[g]["prompt"] for g in group_of[mine]]
        my_meta = [prompts[g] for g in group_of[mine]]
        w = window_for_epoch(cfg, epoch)
        # 2. sample
        batch = sample_epoch(cfg, epoch, ctx, my_prompts, list(range(mine.start, mine.stop)), w)
        # 3. reward (and the discriminator's step), gathered over ranks, and group advantages
        rewards, rinfo, do_g = torch.zeros(len(my_prompts), device=device), {}, True
        if reward_fn is not None:
            r, rinfo = reward_fn(batch["images"], my_prompts, my_meta)
            rewards = rewards + r.to(device)
        if ctx["adversary"] is not None:
            r, do_g, dinfo = adversarial_epoch(cfg, epoch, ctx, batch, my_prompts)
            rewards = rewards + cfg.reward[ctx["adv_kind"]] * r.to(device)
            rinfo.update(dinfo)
        all_rewards = all_gather_cat(rewards)
        finite = bool(torch.isfinite(all_rewards).all() and torch.isfinite(batch["log_probs"]).all())
        finite = all_mean({"ok": float(finite)}, device)["ok"] == 1.0
        adv = compute_advantages(all_rewards, group_of, global_std=cfg.global_std)[mine]
        # 4. update the generator (unless the schedule gives this epoch to the discriminator)
        ginfo = {}
        if finite:
            ctx["counters"]["bad_updates"] = 0
        if do_g and finite:
            ginfo = train_generator(cfg, epoch, ctx, batch, adv)
            ctx["counters"]["g_epochs"] += 1
        elif not finite:
            note_bad_update(cfg, ctx, master, f"epoch {epoch}: non-finite rewards or log-probs, update skipped")
        # 5. log
        stats = all_mean({**rinfo, **ginfo}, device)
        r = all_rewards.cpu().double().numpy().reshape(-1, cfg.group_size)
        stats.update(ev)
        if ev:  # pair the evaluation with this epoch's training reward, then ask the monitor
            history[-1] = (float(all_rewards.mean()), history[-1][1])
            warn = E.hacking_warning(history)
            if warn:
                print(f"WARNING {warn}", flush=True)
                stats["hacking_warning"] = 1
        stats.update(epoch=epoch, window=w, reward_mean=float(r.mean()), reward_std=float(r.std()),
                     zero_std_groups=float((r.std(1) < 1e-8).mean()), seconds=time.time() - t0,
                     images_per_s=len(all_rewards) / (time.time() - t0), **ctx["counters"])
        if device.type == "cuda":  # this rank's peak since start-up (torch.cuda.max_memory_allocated)
            stats["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        if master:
            print(epoch_line(stats), flush=True)
            log.write(json.dumps(stats) + "\n")
            log.flush()
            extra_log(stats)
        # 6. checkpoint
        if dist.is_initialized():
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if (epoch + 1) % cfg.save_every == 0 or epoch == cfg.epochs - 1 or stop.item():
            if master:
                save_checkpoint(cfg, ctx, epoch)
            if dist.is_initialized():
                dist.barrier()
        if stop.item():
            if master:
                print(f"SIGTERM: saved epoch {epoch}, exiting", flush=True)
            break
    else:
        if cfg.eval_every and start < cfg.epochs:  # the trained model, logged as epoch = cfg.epochs
            ev = E.evaluate(cfg, ctx, test_prompts, cfg.epochs, history)
            if master:
                log.write(json.dumps(dict(epoch=cfg.epochs, **ev)) + "\n")
                log.flush()
                E.report(cfg.out_dir)
    if dist.is_initialized():
        dist.destroy_process_group()
    return ctx


def load_test_prompts(cfg):
    prompts = [p["prompt"] for p in data.load_prompts(cfg.test_prompts)]
    return prompts[:cfg.eval_max_prompts] if cfg.eval_max_prompts else prompts


def note_bad_update(cfg, ctx, master, msg):
    """Skip a non-finite update, say so, and stop after max_bad_updates in a row (no checkpoint)."""
    ctx["counters"]["bad_updates"] += 1
    if master:
        print(f"WARNING {msg} ({ctx['counters']['bad_updates']} in a row)", flush=True)
    if ctx["counters"]["bad_updates"] >= cfg.max_bad_updates:
        raise SystemExit(f"{cfg.max_bad_updates} non-finite updates in a row: stopping without writing a "
                         "checkpoint. Check the reward for NaN/inf, or lower lr.")


def external_logger(cfg):
    """stats -> None for wandb / tensorboard, when asked for; a clear stop when not installed."""
    if not cfg.log_to:
        return lambda stats: None
    try:
        if cfg.log_to == "wandb":
            import wandb
            run = wandb.init(project="nanoAdvGRPO", name=os.path.basename(cfg.out_dir.rstrip("/")),
                             config=dataclasses.asdict(cfg), resume="allow")
            return lambda stats: run.log(stats, step=stats["epoch"])
        if cfg.log_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(os.path.join(cfg.out_dir, "tensorboard"))

            def log(stats):
                for k, v in stats.items():
                    if isinstance(v, (int, float)) and k != "epoch":
                        writer.add_scalar(k, v, stats["epoch"])
                writer.flush()  # an epoch is minutes long: flush, so a killed run loses nothing
            return log
    except ImportError as e:
        raise SystemExit(f"log_to={cfg.log_to!r} needs its package: pip install {cfg.log_to} ({e})") from None
    raise SystemExit(f"config error: log_to must be '', 'wandb' or 'tensorboard', got {cfg.log_to!r}")


def open_metrics(out_dir, start):
    """metrics.jsonl in append mode; on resume, drop the lines of epochs that will be redone."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if os.path.exists(path):
        keep = [l for l in open(path) if l.strip() and json.loads(l)["epoch"] < start]
        with open(path, "w") as f:
            f.writelines(keep)
    return open(path, "a")


def epoch_line(s):
    """The one stdout line per epoch."""
    line = f"epoch {s['epoch']:4d} | G {s['g_steps']} D {s['d_steps']} | reward {s['reward_mean']:+.4f} ± {s['reward_std']:.4f}"
    if "d_acc" in s:
        line += f" | ref {s['d_real']:+.3f} gen {s['d_fake']:+.3f} D acc {s['d_acc']:.2f}"
    if "clipfrac" in s:
        line += f" | clipfrac {s['clipfrac']:.3f} kl {s['approx_kl']:.1e}"
    line += f" | {s['seconds']:.1f}s {s['images_per_s']:.1f} img/s"
    return line + (f" | peak {s['peak_gib']:.1f} GiB" if "peak_gib" in s else "")


def main(argv=None):
    train(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
