"""
bench/official_side_by_side.py — the published Adv-GRPO code (showlab/Adv-GRPO) and ours, timed in one
process, on one device, on the same random-weight SD3 pipeline and the same LoRA module.

What it measures, per side, after one untimed warm-up iteration (timers between torch.cuda.synchronize):
  (a) sampling with log-probs, VAE decode included on BOTH sides: the published
      `pipeline_with_logprob_random` (its CPS step) against our `train.sample_epoch`;
  (b) one generator update over the images of (a): the published recompute (per micro-batch and trained
      step, a CFG forward of the LoRA transformer, its `sde_step_with_logprob` scoring the stored transition,
      the clipped loss, backward; accelerate's accumulate / backward / clip / step; anomaly detection on, as
      its scripts ship) against our `train.train_generator` (which includes our recompute of the old
      log-probs before the first optimizer step);
  (c) images/s of a generator update at the paper's schedule: per `d_times` (10) epochs, both sides sample
      10 epochs of images (the D-only epochs need samples too) and update the generator once:
      10·n / (10·t_sample + t_update). The 1:1 ("shared") figure is printed too.
The settings are the DINO recipe's per GPU: 512², 10 steps, CFG 4.5, CPS noise level 0.8, window of 2
trained steps at step 0 (published `random_timestep=0`, `train_num_steps=2`), 16 images per sampling call,
training micro-batches of 8, 2 optimizer steps per update, LoRA r32 / alpha 64 on our `model.LORA_TARGETS`
(the published code adapts the same eight joint-attention projections), lr 3e-4, bf16. The published
functions run on our peft-wrapped transformer, so the weights and the adapter are one and the same; the
LoRA is reset to its initial values before each timed stage.

Run on a GPU (the machine needs no network; copy a checkout of github.com/showlab/Adv-GRPO there first):

    python bench/official_side_by_side.py --published=/path/to/Adv-GRPO --out=side.json

Its numbers go to docs/PERF.md with the date, the card and the exact command. Other flags: --iters=3
(timed iterations, averaged), --images=16 (images per epoch on this device), --sample_batch=16,
--published_sample_batch (default: the same; the shipped config samples 1 prompt × 8 images per call),
--train_batch=8, --check_only (the CPS cross-check alone); any train.py key too (--compile=True,
--gradient_checkpointing=True; on CUDA cards under 120 GB checkpointing is turned on for both sides unless
the key is given: the plain G step at train batch 8 needs ~101 GiB). Smoke test on a CPU (numbers
meaningless; it checks that both sides run and give finite log-probs):

    OMP_NUM_THREADS=1 python bench/official_side_by_side.py --published=/path/to/Adv-GRPO --arch=tiny \\
        --images=4 --train_batch=2 --iters=1

Before the models are built it checks, on the CPU in float32, that the published CPS step and our
`sampler.sde_step(kind="cps")` give the same mean, std, log-prob and drawn sample for the same inputs at
every step of the 10-step schedule (to 1e-5), and after the warm-up it reports how far our recompute of the
published sampler's stored transitions is from that sampler's own log-probs (0 up to rounding in float32).

How the published code is used: nothing of it is copied into this repository. Its two diffusers_patch
modules are loaded at run time from --published by file path (under a private package name, so no
`adv_grpo/__init__.py` or other module of that repository runs), and `compute_log_prob` is taken from its
training script's source by name (the script itself imports wandb, absl, ml_collections, ..., so it is not
imported). The rest of its update (loss, accumulation, logging of the loss statistics) lives inside its
`main()` and is re-stated here in the same order with the same maths. They run unchanged with diffusers
0.42 (no patch needed).

Left out, on both sides: the text encoders (prompt embeddings come from a cache; T5 is off, its 128 tokens
are zeros, same shapes), the reward (DINOv2 features, discriminator scores, reference images), the
discriminator step, advantages and all cross-rank gathers (advantages here are fixed random numbers), the
EMA (ours updates it every 8th optimizer step, which a 2-step update from a fresh counter never reaches; the
published `ema.step` is not called), checkpoints and logging. The published launcher uses DeepSpeed ZeRO-2
over 8 GPUs (DeepSpeed is not among our dependencies); here accelerate runs one process with native bf16
autocast (what `mixed_precision="bf16"` gives without DeepSpeed), so both sides compute the same bf16
forward with float32 LoRA weights. The published script turns TF32 matmuls on; here the flags stay at
PyTorch's defaults for both sides (one process). Not yet run on a GPU.
"""

import ast
import contextlib
import copy
import dataclasses
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import types
from collections import defaultdict
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import configurator  # noqa: E402
import model as M  # noqa: E402
import sampler as S  # noqa: E402
import train  # noqa: E402


@dataclass
class Side:
    published: str = ""              # folder of a showlab/Adv-GRPO checkout (required)
    arch: str = "sd3.5-medium" if torch.cuda.is_available() else "tiny"  # random-weight architecture
    images: int = 16                 # images sampled per epoch on this device, by each side
    sample_batch: int = 16           # images per sampling call (ours: sample_batch_size); capped at images
    published_sample_batch: int = 0  # images per published pipeline call; 0: sample_batch (shipped config: 8)
    train_batch: int = 8             # images per training micro-batch (both sides)
    iters: int = 3                   # timed iterations, averaged
    warmup: int = 1                  # untimed iterations first (CUDA context, autotuning, torch.compile)
    check_only: bool = False         # only the CPS cross-check (CPU, no model)
    out: str = ""                    # also write the results as JSON to this file


# The recipe's keys (the published DINO config, per GPU); the batch keys are set from Side.
RECIPE = dict(num_steps=10, guidance_scale=4.5, sde_kind="cps", noise_level=0.8, window_start="0",
              window_size=2, updates_per_epoch=2, lora_rank=32, lora_alpha=64, lr=3e-4, weight_decay=1e-4,
              max_grad_norm=1.0,
              clip_range=1e-5, adv_clip=5.0, beta_kl=0.0, mixed_precision="bf16", t5=False, reward={},
              max_bad_updates=10 ** 9)
ARCH = {"sd3.5-medium": dict(pretrained="random:sd3.5-medium", resolution=512, max_sequence_length=128),
        "tiny": dict(pretrained="random:tiny", resolution=32, max_sequence_length=8)}
PKG = "_adv_grpo_published"   # private package name the published modules are loaded under


USAGE = ("usage: python bench/official_side_by_side.py --published=<Adv-GRPO checkout> [--out=side.json] "
         "[--key=value ...]\n")


def parse(argv):
    """(Side, Config): Side's keys from the command line; the Config is the recipe (RECIPE, ARCH[arch], the
    batch sizes from Side) overridden by any train.py key given, through the project's one parser."""
    side, _ = configurator.parse(argv, Side, configurator.Config, usage=USAGE)  # also --help, unknown keys
    if side.arch not in ARCH:
        raise SystemExit(f"--arch must be one of {sorted(ARCH)}, got {side.arch!r}")
    side.sample_batch = min(side.sample_batch, side.images)
    side.published_sample_batch = min(side.published_sample_batch or side.sample_batch, side.images)
    group = min(16, side.images)                   # images per prompt (the recipe: 16)
    if side.images % group or side.images % side.sample_batch or side.images % side.published_sample_batch:
        raise SystemExit("--images must be a multiple of 16 (or below 16), and of both sample batches")
    keys = {**RECIPE, **ARCH[side.arch], "sample_batch_size": side.sample_batch,
            "train_batch_size": side.train_batch, "group_size": group,
            "prompts_per_epoch": side.images // group}
    _, cfg = configurator.parse([f"--{k}={v!r}" for k, v in keys.items()] + argv, Side, configurator.Config)
    for k in ("sample_batch_size", "train_batch_size", "group_size", "prompts_per_epoch"):
        setattr(cfg, k, keys[k])                   # set by --images / --sample_batch / --train_batch only
    cfg = configurator.resolve_defaults(cfg)
    configurator.validate(cfg, 1)
    return side, cfg


# -----------------------------------------------------------------------------------------------
# The published code, loaded from its checkout

def load_published(folder):
    """The published CPS step, the fast SD3 sampling pipeline and the training script's compute_log_prob,
    from a checkout at `folder`. Returns a namespace with those three and the files' fingerprints."""
    if not folder:
        raise SystemExit("--published=<folder of a showlab/Adv-GRPO checkout> is required")
    folder = os.path.abspath(folder)
    patch = os.path.join(folder, "adv_grpo", "diffusers_patch")
    files = {"sde": os.path.join(patch, "sd3_sde_with_logprob.py"),
             "pipeline": os.path.join(patch, "sd3_pipeline_with_logprob_fast.py"),
             "script": os.path.join(folder, "scripts", "train_sd3_fast_dino_patch.py")}
    missing = [p for p in files.values() if not os.path.isfile(p)]
    if missing:
        raise SystemExit(f"--published={folder}: not a showlab/Adv-GRPO checkout (missing {missing[0]})")
    if folder not in sys.path:
        sys.path.append(folder)  # at the end: our modules keep their names
    # A private parent package whose path is the diffusers_patch folder: the pipeline's relative import of
    # the step resolves to it, and no __init__ of the published repository runs.
    pkg = types.ModuleType(PKG)
    pkg.__path__ = [patch]
    sys.modules[PKG] = pkg
    mods = {}
    for key in ("sde", "pipeline"):
        name = f"{PKG}.{os.path.basename(files[key])[:-3]}"
        spec = importlib.util.spec_from_file_location(name, files[key])
        mods[key] = importlib.util.module_from_spec(spec)
        sys.modules[name] = mods[key]
        spec.loader.exec_module(mods[key])
    cps_step = mods["sde"].sde_step_with_logprob_new
    if getattr(mods["pipeline"], "sde_step_with_logprob", None) is not cps_step:
        print("WARNING the published fast pipeline does not sample with sde_step_with_logprob_new (CPS)")
    # compute_log_prob, by name from the training script's source, with the script's binding of
    # sde_step_with_logprob (the CPS step)
    tree = ast.parse(open(files["script"]).read(), files["script"])
    node = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "compute_log_prob"]
    if not node:
        raise SystemExit(f"{files['script']} has no compute_log_prob: another version of the published code?")
    ns = {"torch": torch, "sde_step_with_logprob": cps_step}
    exec(compile(ast.Module(body=node, type_ignores=[]), files["script"], "exec"), ns)
    try:
        commit = subprocess.run(["git", "-C", folder, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    sha = {k: hashlib.sha256(open(p, "rb").read()).hexdigest()[:16] for k, p in files.items()}
    return types.SimpleNamespace(cps_step=cps_step, pipeline=mods["pipeline"].pipeline_with_logprob_random,
                                 compute_log_prob=ns["compute_log_prob"], folder=folder, commit=commit,
                                 sha256=sha)


# -----------------------------------------------------------------------------------------------
# Cross-check of the CPS step (CPU, float32)

def check_cps(P, num_steps=10, noise_level=0.8, shift=3.0, tol=1e-5):
    """The published CPS step and sampler.sde_step(kind="cps") on the same (x, v), at every step of the
    schedule: mean, std and log-prob of a given next sample, and the sample each draws from equal seeds."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(num_steps, device="cpu")
    sigmas = sched.sigmas.float()
    g = torch.Generator().manual_seed(0)
    worst = defaultdict(float)
    for i in range(num_steps):
        x, v, prev = (torch.randn(3, 16, 8, 8, generator=g) for _ in range(3))
        t = sched.timesteps[i].repeat(len(x))
        _, lp_p, mean_p, std_p = P.cps_step(sched, v, t, x, noise_level=noise_level, prev_sample=prev)
        _, lp_o, mean_o, std_o = S.sde_step(v, x, sigmas[i], sigmas[i + 1], noise_level, "cps",
                                            prev_sample=prev)
        seed = lambda: torch.Generator().manual_seed(i)  # noqa: E731  the same draws on both sides
        x_p = P.cps_step(sched, v, t, x, noise_level=noise_level, generator=seed())[0]
        x_o = S.sde_step(v, x, sigmas[i], sigmas[i + 1], noise_level, "cps", generator=seed())[0]
        for key, a, b in (("mean", mean_p, mean_o), ("std", std_p, std_o), ("log_prob", lp_p, lp_o),
                          ("sample", x_p, x_o)):
            worst[key] = max(worst[key], (a.float() - torch.as_tensor(b).float()).abs().max().item())
    ok = all(v <= tol for v in worst.values())
    print(f"CPS cross-check (CPU float32, {num_steps} steps, a={noise_level}): max |published - ours| "
          + ", ".join(f"{k} {v:.1e}" for k, v in worst.items())
          + f" -> {'OK' if ok else 'FAILED'} (tol {tol:g})")
    return dict(max_abs_diff=dict(worst), tol=tol, ok=ok)


# -----------------------------------------------------------------------------------------------
# The published side: its pipeline and recompute, on our transformer

class AsPublished(torch.nn.Module):
    """Our (peft-wrapped) transformer as the published code holds it: the module accelerate prepares (its
    forward then runs under bf16 autocast and returns float32) and the pipeline's `transformer`."""

    def __init__(self, transformer):
        super().__init__()
        self.inner = transformer

    config = property(lambda self: self.inner.config)
    device = property(lambda self: self.inner.device)
    dtype = property(lambda self: self.inner.dtype)

    def forward(self, **kwargs):
        return self.inner(**kwargs)


def published_setup(gen, cfg, passes):
    """accelerate (one process, the run's mixed precision, gradient accumulation over the passes of one
    optimizer step), the prepared transformer and AdamW, and a pipeline object that shares every component
    of ours but calls the prepared transformer."""
    from accelerate import Accelerator
    acc = Accelerator(mixed_precision="bf16" if cfg.mixed_precision == "bf16" else "no",
                      gradient_accumulation_steps=passes // cfg.updates_per_epoch,
                      cpu=gen.device.type == "cpu")
    opt = torch.optim.AdamW(list(gen.params.values()), lr=cfg.lr, betas=(0.9, 0.999),
                            weight_decay=cfg.weight_decay, eps=1e-8)
    wrapped, opt = acc.prepare(AsPublished(gen.transformer), opt)
    pipe = copy.copy(gen.pipe)                     # shallow: the same VAE, scheduler, encoders
    object.__setattr__(pipe, "transformer", wrapped)
    pipe.set_progress_bar_config(disable=True)
    return acc, wrapped, opt, pipe


def published_sample(P, pipe, gen, cfg, side, prompts):
    """The published sampling of `prompts` (one image each), side.published_sample_batch per pipeline call,
    stacked into the per-image arrays its training loop reads."""
    neg_e, neg_p = gen.encode([""])
    out = []
    for b in range(0, len(prompts), side.published_sample_batch):
        e, p = gen.encode(prompts[b:b + side.published_sample_batch])
        images, latents, log_probs, timesteps = P.pipeline(
            pipe, prompt_embeds=e, pooled_prompt_embeds=p, negative_prompt_embeds=neg_e.repeat(len(e), 1, 1),
            negative_pooled_prompt_embeds=neg_p.repeat(len(e), 1), num_inference_steps=cfg.num_steps,
            guidance_scale=cfg.guidance_scale, output_type="pt", height=cfg.resolution, width=cfg.resolution,
            noise_level=cfg.noise_level, mini_num_image_per_prompt=1, train_num_steps=cfg.window_size,
            process_index=0, sample_num_steps=cfg.num_steps, random_timestep=int(cfg.window_start),
            max_sequence_length=cfg.max_sequence_length)
        latents = torch.stack(latents, dim=1)                          # (B, K+1, C, h, w)
        out.append(dict(prompt_embeds=e, pooled_prompt_embeds=p, timesteps=torch.stack(timesteps, dim=1),
                        latents=latents[:, :-1], next_latents=latents[:, 1:],
                        log_probs=torch.stack(log_probs, dim=1), images=images))
    return {k: torch.cat([o[k] for o in out]) for k in out[0]}


def published_update(P, acc, wrapped, opt, pipe, gen, cfg, side, batch, advantages):
    """The published generator update over `batch`: micro-batches in sampling order, for each trained step
    its compute_log_prob (CFG forward + CPS step scoring the stored transition), the ratio against the
    sampler's log-probs, the clipped loss, accelerate's backward / clip / step / zero_grad; per optimizer
    step the mean of the loss statistics, read out as its logger would. Returns those statistics."""
    pcfg = types.SimpleNamespace(train=types.SimpleNamespace(cfg=cfg.guidance_scale > 1),
                                 sample=types.SimpleNamespace(guidance_scale=cfg.guidance_scale,
                                                              noise_level=cfg.noise_level))
    neg_e, neg_p = gen.encode([""])
    eps, n, logged = cfg.clip_range, len(advantages), []
    adv_all = advantages[:, None].repeat(1, cfg.window_size)            # (n, K): one value per trained step
    info = defaultdict(list)
    wrapped.train()
    for b in range(0, n, side.train_batch):
        sample = {k: v[b:b + side.train_batch] for k, v in batch.items() if k != "images"}
        sample["advantages"] = adv_all[b:b + side.train_batch]
        m = len(sample["prompt_embeds"])
        embeds = torch.cat([neg_e.repeat(m, 1, 1), sample["prompt_embeds"]])       # [uncond; cond]
        pooled = torch.cat([neg_p.repeat(m, 1), sample["pooled_prompt_embeds"]])
        for j in range(cfg.window_size):
            with acc.accumulate(wrapped):
                _, log_prob, _, _ = P.compute_log_prob(wrapped, pipe, sample, j, embeds, pooled, pcfg)
                a = sample["advantages"][:, j].clamp(-cfg.adv_clip, cfg.adv_clip)
                ratio = torch.exp(log_prob - sample["log_probs"][:, j])
                policy_loss = torch.maximum(-a * ratio, -a * ratio.clamp(1.0 - eps, 1.0 + eps)).mean()
                loss = policy_loss                                        # beta = 0: no KL term
                info["approx_kl"].append(0.5 * ((log_prob - sample["log_probs"][:, j]) ** 2).mean())
                info["clipfrac"].append(((ratio - 1.0).abs() > eps).float().mean())
                info["clipfrac_gt_one"].append((ratio - 1.0 > eps).float().mean())
                info["clipfrac_lt_one"].append((1.0 - ratio > eps).float().mean())
                info["policy_loss"].append(policy_loss)
                info["loss"].append(loss)
                info["logp_gap"].append((log_prob - sample["log_probs"][:, j]).abs().max())
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(wrapped.parameters(), cfg.max_grad_norm)
                opt.step()
                opt.zero_grad()
            if acc.sync_gradients:
                stats = acc.reduce({k: torch.stack(v).mean() for k, v in info.items() if k != "logp_gap"},
                                   reduction="mean")
                stats = {k: v.item() for k, v in stats.items()}              # what logging reads
                stats["logp_gap"] = torch.stack(info["logp_gap"]).max().item()
                logged.append(stats)
                info = defaultdict(list)
    wrapped.eval()
    return logged


# -----------------------------------------------------------------------------------------------
# Timing

class Timer:
    """Seconds and, on CUDA, peak allocated memory of each named stage, summed over calls."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.seconds, self.peak = defaultdict(list), defaultdict(int)

    @contextlib.contextmanager
    def __call__(self, name, record=True):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        if record:
            self.seconds[name].append(time.perf_counter() - t0)
            if self.cuda:
                self.peak[name] = max(self.peak[name], torch.cuda.max_memory_allocated())

    def mean(self, name):
        return sum(self.seconds[name]) / len(self.seconds[name])


def cross_logp_gap(cfg, gen, pub_batch):
    """Our recompute (train.step_log_prob, no grad) of the published sampler's stored transitions, against
    the log-probs that sampler returned: the largest |difference| over images and trained steps."""
    batch = dict(emb=pub_batch["prompt_embeds"], pool=pub_batch["pooled_prompt_embeds"],
                 x=pub_batch["latents"].float(), x_next=pub_batch["next_latents"].float(),
                 step_idx=torch.arange(int(cfg.window_start), int(cfg.window_start) + cfg.window_size))
    gap = 0.0
    with torch.no_grad():
        for mb in torch.arange(len(batch["x"]), device=gen.device).split(cfg.train_batch_size):
            for j in range(cfg.window_size):
                lp = train.step_log_prob(cfg, gen, gen.transformer, batch, mb, j)[0]
                gap = max(gap, (lp - pub_batch["log_probs"][mb, j].float()).abs().max().item())
    return gap


def run(side, cfg, P, device):
    torch.manual_seed(cfg.seed)
    gen = M.build_generator(cfg, device)
    n = side.images
    prompts = [f"side-by-side prompt {i // cfg.group_size}: a red cube on a blue table" for i in range(n)]
    gen.encode(["", *prompts])                  # the embedding cache, filled before any timer
    passes = n // cfg.train_batch_size * cfg.window_size
    acc, wrapped, pub_opt, pub_pipe = published_setup(gen, cfg, passes)
    initial = {k: p.detach().clone() for k, p in gen.params.items()}

    def reset():
        """The LoRA back to its initial values, both optimizers fresh, no gradients: each timed update
        starts from the weights the samples were drawn with."""
        with torch.no_grad():
            for k, p in gen.params.items():
                p.copy_(initial[k])
                p.grad = None
        gen.opt.state.clear()
        pub_opt.optimizer.state.clear()

    advantages = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(device)
    timer, notes = Timer(device), defaultdict(list)
    for it in range(side.warmup + side.iters):
        rec = it >= side.warmup
        order = ("published", "ours") if it % 2 else ("ours", "published")   # alternate who goes first
        batches = {}
        for who in order:
            reset()
            if who == "ours":
                with timer("ours/sample", rec):
                    batches[who] = train.sample_epoch(cfg, it, gen, prompts, list(range(n)),
                                                      int(cfg.window_start), progress=False)
            else:
                with timer("published/sample", rec), torch.autograd.set_detect_anomaly(True):
                    batches[who] = published_sample(P, pub_pipe, gen, cfg, side, prompts)
            notes[f"{who}/sampler_logp_finite"].append(bool(torch.isfinite(batches[who]["log_probs"]).all()))
        if it == 0:
            notes["cross_logp_gap"].append(cross_logp_gap(cfg, gen, batches["published"]))
        for who in order:
            reset()
            if who == "ours":
                counters = dict(g_steps=0, bad_updates=0)
                with timer("ours/update", rec):
                    info = train.train_generator(cfg, it, gen, batches[who], advantages, counters,
                                                 progress=False)
                notes["ours/optimizer_steps"].append(counters["g_steps"])
                notes["ours/update_info"].append(info)
                notes["ours/loss_finite"].append(bool(torch.isfinite(torch.tensor(info["loss"]))))
            else:
                with timer("published/update", rec), torch.autograd.set_detect_anomaly(True):
                    logged = published_update(P, acc, wrapped, pub_opt, pub_pipe, gen, cfg, side,
                                              batches[who], advantages)
                notes["published/optimizer_steps"].append(len(logged))
                notes["published/update_info"].append(logged)
                notes["published/loss_finite"].append(
                    all(torch.isfinite(torch.tensor(s["loss"])) for s in logged))
        del batches
    reset()
    return summarize(side, cfg, timer, notes)


def summarize(side, cfg, timer, notes):
    n, k = side.images, cfg.d_times
    res = {}
    for who in ("published", "ours"):
        ts, tu = timer.mean(f"{who}/sample"), timer.mean(f"{who}/update")
        res[who] = dict(
            sample_s=ts, sample_images_per_s=n / ts, update_s=tu, update_images_per_s=n / tu,
            paper_schedule_s_per_g_update=k * ts + tu, paper_schedule_images_per_s=k * n / (k * ts + tu),
            shared_schedule_images_per_s=n / (ts + tu),
            sample_peak_gib=timer.peak[f"{who}/sample"] / 2 ** 30 if timer.cuda else None,
            update_peak_gib=timer.peak[f"{who}/update"] / 2 ** 30 if timer.cuda else None,
            sampler_logp_finite=all(notes[f"{who}/sampler_logp_finite"]),
            loss_finite=all(notes[f"{who}/loss_finite"]),
            optimizer_steps_per_update=notes[f"{who}/optimizer_steps"][-1],
            first_update_info=notes[f"{who}/update_info"][0],
            seconds=dict(sample=timer.seconds[f"{who}/sample"], update=timer.seconds[f"{who}/update"]))
    res["cross_logp_gap"] = notes["cross_logp_gap"][0]
    return res


def table(side, cfg, device, res):
    """The printed summary: seconds and images/s per stage and side, then what the numbers rest on."""
    p, o = res["published"], res["ours"]
    mode = ("compiled" if cfg.compile else "eager") + (", checkpointing" if cfg.gradient_checkpointing
                                                        else "")
    head = (f"{side.arch} {cfg.resolution}² on {device_name(device)} | {cfg.mixed_precision}, {mode}"
            f" | {side.images} images/epoch, sampling calls of {side.published_sample_batch} (published) / "
            f"{side.sample_batch} (ours), train micro-batch {side.train_batch}, {cfg.num_steps} steps, "
            f"window {cfg.window_start}..{int(cfg.window_start) + cfg.window_size}, "
            f"CFG {cfg.guidance_scale}, "
            f"CPS a={cfg.noise_level} | VAE decode: both sides | mean of {side.iters} after {side.warmup} "
            f"warm-up")
    rows = [("(a) sampling + decode", "sample_s", "sample_images_per_s"),
            ("(b) G update", "update_s", "update_images_per_s"),
            (f"(c) paper {cfg.d_times - 1} D : 1 G", "paper_schedule_s_per_g_update",
             "paper_schedule_images_per_s"),
            ("    shared 1 : 1", None, "shared_schedule_images_per_s")]
    lines = [head, f"{'stage':<24} {'published s':>12} {'img/s':>9} {'ours s':>10} {'img/s':>9} "
                   f"{'ours/published':>15}"]
    for name, s_key, r_key in rows:
        ps = f"{p[s_key]:12.3f}" if s_key else f"{'':>12}"
        os_ = f"{o[s_key]:10.3f}" if s_key else f"{'':>10}"
        lines.append(f"{name:<24} {ps} {p[r_key]:9.2f} {os_} {o[r_key]:9.2f} {o[r_key] / p[r_key]:14.2f}×")
    if p["sample_peak_gib"] is not None:
        lines.append(f"peak GiB (a) / (b): published {p['sample_peak_gib']:.1f} / "
                     f"{p['update_peak_gib']:.1f}, ours {o['sample_peak_gib']:.1f} / "
                     f"{o['update_peak_gib']:.1f}")
    pi, oi = p["first_update_info"][0], o["first_update_info"]
    lines += [
        f"(c): s = seconds per G update = {cfg.d_times} epochs of sampling + 1 G update; img/s = images "
        f"sampled / s. Left out on both sides: reward, D step, text encoders",
        f"optimizer steps per update: published {p['optimizer_steps_per_update']}, ours "
        f"{o['optimizer_steps_per_update']} | published: anomaly detection on, old log-probs = its "
        f"sampler's; ours: old log-probs recomputed (inside (b))",
        f"old log-probs at unchanged weights: published max |log p - sampler's| {pi['logp_gap']:.2e}, "
        f"clipfrac of its first optimizer step {pi['clipfrac']:.2f}; ours max |recompute - sampler's| "
        f"{oi['sampler_logp_gap']:.2e} (not used)",
        f"our recompute of the published samples vs the published sampler's log-probs: max |diff| "
        f"{res['cross_logp_gap']:.2e} ({cfg.mixed_precision})",
        f"finite: sampler log-probs published {p['sampler_logp_finite']}, ours {o['sampler_logp_finite']}; "
        f"losses published {p['loss_finite']}, ours {o['loss_finite']}"]
    return "\n".join(lines)


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    side, cfg = parse(argv)
    M.quiet_libraries()
    P = load_published(side.published)
    cps = check_cps(P, cfg.num_steps, cfg.noise_level, M.ARCHS[side.arch]["shift"])
    result = dict(date=time.strftime("%Y-%m-%d"), argv=argv, cps_check=cps,
                  published=dict(folder=P.folder, commit=P.commit, sha256=P.sha256))
    if not cps["ok"]:
        raise SystemExit("CPS cross-check failed: the two steps differ, so the timings would compare "
                         "different maths")
    if not side.check_only:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if (device.type == "cuda" and not any(a.startswith("--gradient_checkpointing") for a in argv)
                and torch.cuda.get_device_properties(device).total_memory < 120 * 2 ** 30):
            cfg = dataclasses.replace(cfg, gradient_checkpointing=True)
            print("gradient_checkpointing=True (card under 120 GB; one module, so both sides)")
        try:
            res = run(side, cfg, P, device)
        except torch.OutOfMemoryError as e:
            raise SystemExit(f"out of memory: {str(e).splitlines()[0]} (try --gradient_checkpointing=True "
                             f"or a smaller --train_batch)") from None
        print(table(side, cfg, device, res), flush=True)
        import accelerate
        import diffusers
        import peft
        result.update(device=device_name(device), torch=torch.__version__, diffusers=diffusers.__version__,
                      peft=peft.__version__, accelerate=accelerate.__version__, side=dataclasses.asdict(side),
                      config=dataclasses.asdict(cfg), results=res)
        ok = all(res[w][k] for w in ("published", "ours") for k in ("sampler_logp_finite", "loss_finite"))
        if not ok:
            print("WARNING non-finite log-probs or losses (see the JSON)")
    if side.out:
        with open(side.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
