"""
bench.py — seconds, images/s, TFLOP/s, MFU and peak memory of each stage of an Adv-GRPO epoch, with
random weights (no download): SD3.5-M on one GPU, or the tiny architecture on a CPU. See docs/PERF.md.

    python bench.py                                   # CUDA: SD3.5-M 512², the per-GPU recipe; CPU: tiny
    python bench.py --compile --eager_baseline        # eager, then torch.compile'd, in one process
    python bench.py --low_mem                         # the 24 GB option set
    python bench.py --count_only --arch=sd3.5-medium  # FLOPs only, on shape-only models (any machine)
    python bench.py --count_only --arch=sd3.5-medium --objective=nft  # DiffusionNFT's, CFG-free
    python bench.py --resolution=1024 --out=b.json    # other --key=value are train.Config keys

It runs train.py's own functions (model.build_generator, sample_epoch, score_epoch, the adversary's update,
train_generator) on one GPU's share of the recipe: 96 images = 6 prompts × 16, sample batch 16, train batch
8, 10 steps, window 2, CFG 4.5 (the published recipe). Timers sit between torch.cuda.synchronize() calls.
Two rows are work that happens inside another stage: the VAE decode (inside sample_epoch) and the
recompute of the old log-probs (inside train_generator). Each is timed by a second call of the same
function on as much work, and subtracted from its enclosing stage, so the rows add up to the epoch.

FLOPs: FlopCounterMode on one call of each model at the run's batch shapes, times the number of calls,
counted on a shape-only copy (meta weights made fake tensors): no memory, no gradients left behind, the
same count on a laptop as on the GPU. Model FLOPs: checkpointing's recomputation is not counted.

Departs from train.py where a benchmark must: the "shared" schedule with one D step (every epoch has
every stage), new prompts each epoch (encoding is measured, not served from the cache), no progress bars,
non-finite updates never stop the run. Leaves out DDP all-reduces, reading references from disk, checkpoints.
"""

import contextlib
import dataclasses
import gc
import json
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import configurator
import data
import model as M
import nft
import reward as R
import sampler as S
import train

# -----------------------------------------------------------------------------------------------
# Config: the bench's own knobs; every other --key=value is a train.py key (configurator.Config), e.g.
# --compile, --gradient_checkpointing, --resolution=1024. `epochs` here shadows Config's.

@dataclass
class Bench:
    arch: str = "sd3.5-medium" if torch.cuda.is_available() else "tiny"  # random-weight architecture (ARCH)
    epochs: int = 2                  # timed epochs, averaged
    warmup_epochs: int = 1           # untimed epochs first: CUDA context, cuBLAS autotune, torch.compile
    eager_baseline: bool = False     # run eager, then compiled (compile=True), in one process; print both
    count_only: bool = False         # count FLOPs and stop (no timing, no real models built)
    peak_tflops: float = 989.0       # MFU denominator: H100/H200 SXM dense bf16 (NVIDIA data sheet)
    out: str = ""                    # also write the results as JSON to this file


# The per-GPU share of the recipe; everything not named here is train.Config's default (= the paper's).
ARCH = {
    "sd3.5-medium": dict(pretrained="random:sd3.5-medium", prompts_per_epoch=6,
                         dino_backbone="random:vit_base_patch14_dinov2"),  # random DINOv2-B/14, 518²
    "tiny": dict(pretrained="random:tiny", t5=False, resolution=32, max_sequence_length=8, lora_rank=4,
                 lora_alpha=8, prompts_per_epoch=2, group_size=4, sample_batch_size=4, train_batch_size=2,
                 dino_backbone="random:tiny", dino_image_size=28),
}
COMMON = dict(reward={"dino_adv": 1.0}, schedule="shared", d_steps=1, max_bad_updates=10 ** 9)
LOW_MEM = dict(low_mem=True, gradient_checkpointing=True, compile=False)  # = config/sd35m_24gb.py
STAGES = ("encode", "sample", "decode", "reward", "d_step", "old_logp", "g_step")
INNER = {"sample": "decode", "g_step": "old_logp"}  # work inside the outer stage, timed alone and subtracted


def parse(argv):
    """(Bench, Config): the bench's keys and train.py's, through the one parser; the Config keys start
    from ARCH[arch] (and LOW_MEM), then the command line."""
    b, cfg = configurator.parse(argv, Bench, configurator.Config, usage=__doc__.split("\n\n")[1] + "\n")
    if b.arch not in ARCH:
        raise SystemExit(f"--arch must be one of {sorted(ARCH)}, got {b.arch!r}")
    # --low_mem (a train.py key) brings the whole 24 GB set: what config/sd35m_24gb.py sets
    preset = {**COMMON, **ARCH[b.arch], **(LOW_MEM if cfg.low_mem else {})}
    b, cfg = configurator.parse([f"--{k}={v!r}" for k, v in preset.items()] + list(argv), Bench,
                                configurator.Config)
    configurator.validate(configurator.resolve_defaults(cfg), 1)
    if bad := R.check_config(cfg)[0]:
        raise SystemExit(f"config error: {bad}")
    return b, cfg


# -----------------------------------------------------------------------------------------------
# Models and data, as the loop builds them

def random_references(cfg, k=8):
    """k random-noise PNGs written to a temporary folder and read back by data.ReferenceSet (folder mode:
    real for every prompt). The images are held in memory, so the folder can go at once."""
    rng = np.random.default_rng(cfg.seed)
    with tempfile.TemporaryDirectory() as folder:
        for i in range(k):
            pixels = rng.integers(0, 256, (cfg.resolution, cfg.resolution, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(f"{folder}/{i}.png")
        return data.ReferenceSet.from_folder(folder, size=cfg.resolution)


# -----------------------------------------------------------------------------------------------
# FLOPs, counted once per call shape

aten = torch.ops.aten
CPU_ATTENTION = {  # FlopCounterMode counts the CUDA attention kernels but not this one
    aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, **__: sdpa_flop_count(q, k, v),
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda g, q, k, v, *_, **__: sdpa_backward_flop_count(g, q, k, v),
}


def count(fn):
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as fc:
        fn()
    return fc.get_total_flops()


def count_flops(cfg):
    """FLOPs of one call of each model at the run's shapes, on a shape-only copy: built on the meta
    device, then turned into fake CPU tensors (torch.autocast refuses the device type "meta")."""
    cfg = dataclasses.replace(cfg, compile=False, gradient_checkpointing=False, t5=False,  # no T5: zeros
                              low_mem=False)
    meta = torch.device("meta")
    gen = M.build_generator(cfg, meta)
    with meta:
        adv = R.build_adversary(cfg, meta)
    emb, pool = gen.encode([""])                                       # (1, T, D), (1, P): the real shapes
    shape = gen.latent_shape()                                         # (C, h, w)
    guidance = nft.sampling_guidance(cfg)
    cfg_rows = 2 if guidance > 1 else 1                               # CFG doubles the batch
    sb, tb = cfg.sample_batch_size, cfg.train_batch_size
    with FakeTensorMode(allow_non_fake_inputs=True):
        for m in (gen.transformer, gen.pipe.vae, adv):
            m.to_empty(device="cpu")
        # the loop needs only the text encoders' outputs, and the count only their shapes
        gen = dataclasses.replace(gen, encode=ShapeOnlyEncoder(emb.shape[1:], pool.shape[1:]),
                                  sigmas=S.flow_sigmas(gen.pipe.scheduler, cfg.num_steps))  # real CPU floats
        e, p = gen.encode([""] * sb)
        vel = S.make_velocity_fn(gen.transformer, e, p, e, p, guidance, gen.autocast)
        x = torch.empty(tb, cfg.window_size, *shape)                  # (B, K, C, h, w)
        e, p = gen.encode([""] * tb)
        batch = dict(emb=e, pool=p, x=x, x_next=x, step_idx=list(range(cfg.window_size)))
        log_prob = lambda: train.step_log_prob(cfg, gen, gen.transformer, batch, torch.arange(tb), 0)[0]
        if cfg.objective == "nft":  # its loss's forward: the conditional velocity (no CFG) at x_t
            log_prob = lambda: nft.velocity(gen.transformer, gen, batch, torch.arange(tb), x[:, 0],
                                            gen.sigmas[:1].expand(tb))
        with torch.no_grad():
            f = dict(sample_forward=count(lambda: vel(torch.empty(sb, *shape), gen.sigmas[0])),
                     train_forward=count(log_prob),
                     decode_per_image=count(lambda: S.decode_latents(gen.pipe.vae, torch.empty(1, *shape))),
                     dino_per_image=count(lambda: adv.features(torch.empty(1, 3, cfg.resolution,
                                                                           cfg.resolution))))
        gen.transformer.train()
        f["train_forward_backward"] = count(lambda: log_prob().sum().backward())
    f.update(sample_rows=sb * cfg_rows, train_rows=tb * (1 if cfg.objective == "nft" else cfg_rows),
             forward_per_row=f["sample_forward"] / (sb * cfg_rows))
    return f


class ShapeOnlyEncoder:
    """Stands in for model.PromptEncoder when only the shapes of the embeddings matter (FLOP counting)."""

    def __init__(self, emb_shape, pool_shape):
        self.emb_shape, self.pool_shape = emb_shape, pool_shape

    def __call__(self, prompts):
        return torch.empty(len(prompts), *self.emb_shape), torch.empty(len(prompts), *self.pool_shape)


def flops_per_epoch(cfg, f):
    """Stage → FLOPs of one epoch (encode and the 2-layer D head are not counted: negligible)."""
    n = cfg.prompts_per_epoch * cfg.group_size
    if cfg.objective == "nft":  # a pass: forwards of v_old (and v_ref if beta_kl > 0), v_θ forward + backward
        passes = n // cfg.train_batch_size * nft.timesteps_per_image(cfg)
        no_grad = (1 + (cfg.beta_kl > 0)) * f["train_forward"]
        return dict(sample=n // cfg.sample_batch_size * cfg.num_steps * f["sample_forward"],
                    decode=n * f["decode_per_image"], reward=2 * n * f["dino_per_image"], old_logp=0,
                    g_step=passes * (no_grad + f["train_forward_backward"]))
    return dict(sample=n // cfg.sample_batch_size * cfg.num_steps * f["sample_forward"],
                decode=n * f["decode_per_image"],
                reward=2 * n * f["dino_per_image"],          # generations + one reference each
                # the old log-probs: forwards of the passes after the first optimizer step
                # (train.old_log_probs)
                old_logp=(cfg.updates_per_epoch - 1) * (n // cfg.train_batch_size * cfg.window_size
                                                         // cfg.updates_per_epoch) * f["train_forward"],
                g_step=n // cfg.train_batch_size * cfg.window_size * f["train_forward_backward"])


# -----------------------------------------------------------------------------------------------
# Timing

class Stages:
    """Seconds and peak CUDA memory per named stage. Regions may nest: an inner region's peak is passed
    on to the enclosing one, whose own peak statistic the inner reset would otherwise lose."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.seconds, self.peak, self._inner = defaultdict(float), defaultdict(int), 0

    @contextlib.contextmanager
    def __call__(self, name):
        if self.cuda:
            torch.cuda.synchronize()
            outer = max(self._inner, torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
            self._inner = 0
        t0 = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds[name] += time.perf_counter() - t0
        if self.cuda:
            peak = max(self._inner, torch.cuda.max_memory_allocated())
            self.peak[name] = max(self.peak[name], peak)
            self._inner = max(outer, peak)


def run(b, cfg, device, flops):
    """Build the real models, run warm-up + timed epochs of the real loop; returns the result dict."""
    torch.manual_seed(cfg.seed)
    gen = M.build_generator(cfg, device)
    adversary, references = R.build_adversary(cfg, device), random_references(cfg)
    n, epochs = cfg.prompts_per_epoch * cfg.group_size, b.warmup_epochs + b.epochs
    prompts = [[f"bench prompt {e}-{i}: a red cube on a blue table" for i in range(cfg.prompts_per_epoch)]
               for e in range(epochs)]
    timers = [Stages(device) for _ in range(epochs)]
    gen.encode([""])
    for e in range(epochs):  # all prompts first: --low_mem frees the text encoders before sampling
        with timers[e]("encode"):
            gen.encode(prompts[e])
    if cfg.low_mem:  # as train.train does
        gen.encode.drop_text_encoders()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    skipped = nonfinite = 0
    for e in range(epochs):
        st, mine = timers[e], [{"prompt": p} for p in prompts[e] for _ in range(cfg.group_size)]
        with st("sample"):   # the VAE decode included; timed alone below, on as many latents, and subtracted
            batch = train.sample_epoch(cfg, e, gen, [p["prompt"] for p in mine], list(range(n)),
                                       train.window_for_epoch(cfg, e), progress=False)
        with st("decode"), torch.no_grad():
            gen.decode(torch.randn(n, *gen.latent_shape(), device=device))
        with st("reward"):
            rewards, _, d_batch, _ = train.score_epoch(cfg, e, 0, batch, mine, None, adversary, references)
        with st("d_step"):
            if d_batch is not None:
                adversary.update(d_batch, 1)
        nonfinite += int(e >= b.warmup_epochs and d_batch is None)  # then φ and D did not run
        advantages = train.compute_advantages(rewards, [p["prompt"] for p in mine], global_std=cfg.global_std)
        with st("old_logp"):  # train_generator's recompute of the old log-probs, timed alone and subtracted
            if cfg.objective == "grpo":  # (nft has none: its v_old forwards are inside g_step)
                passes = train.training_passes(cfg, e, 0, n, device)
                train.old_log_probs(cfg, gen, batch, passes[len(passes) // cfg.updates_per_epoch:])
        with st("g_step"):
            counters = dict(g_steps=0, bad_updates=0)
            skipped += train.train_generator(cfg, e, gen, batch, advantages, counters,
                                             progress=False)["skipped_updates"]
        del batch
    return summarize(b, cfg, timers, flops, skipped, nonfinite)


def summarize(b, cfg, timers, flops, skipped, nonfinite):
    """Mean per timed epoch of each stage (inner stages subtracted from their outer one), with FLOP rates."""
    n, timed, fl = (cfg.prompts_per_epoch * cfg.group_size, timers[b.warmup_epochs:],
                    flops_per_epoch(cfg, flops))
    cuda, stages = timers[0].cuda, {}
    for name in STAGES:
        s = np.mean([t.seconds[name] - t.seconds.get(INNER.get(name), 0) for t in timed])
        stages[name] = dict(seconds=s, tflop=fl[name] / 1e12 if name in fl else None,
                            peak_gib=max(t.peak[name] for t in timed) / 2 ** 30 if cuda else None)
    stages["epoch"] = dict(seconds=sum(r["seconds"] for r in stages.values()), tflop=sum(fl.values()) / 1e12,
                           peak_gib=max(r["peak_gib"] for r in stages.values()) if cuda else None)
    for r in stages.values():
        r["images_per_s"] = n / r["seconds"]
        r["tflops"] = r["tflop"] / r["seconds"] if r["tflop"] is not None else None
        r["mfu"] = r["tflops"] / b.peak_tflops if r["tflop"] is not None else None
    warmup = sum(v for t in timers[:b.warmup_epochs] for k, v in t.seconds.items() if k not in INNER.values())
    return dict(stages=stages, images_per_epoch=n, warmup_seconds=warmup, skipped_updates=skipped,
                nonfinite_epochs=nonfinite, compile=cfg.compile,
                gradient_checkpointing=cfg.gradient_checkpointing, low_mem=cfg.low_mem)


def table(name, res):
    head = f"{name}: {res['images_per_epoch']} images/epoch, warm-up {res['warmup_seconds']:.1f} s"
    if res["skipped_updates"]:
        head += f", {res['skipped_updates']} non-finite updates skipped (random weights)"
    if res["nonfinite_epochs"]:
        head += f", WARNING: {res['nonfinite_epochs']} epochs made non-finite images, so φ and D did not run"
    cols = ("s/epoch", "img/s", "TFLOP", "TFLOP/s", "MFU", "peak GiB")
    lines = [head, f"{'stage':8s} " + " ".join(f"{c:>{7 if c == 'MFU' else 9}s}" for c in cols)]
    fmt = lambda v, f: f"{'—':>{f[:-1].split('.')[0]}}" if v is None else format(v, f)
    for stage, r in res["stages"].items():
        lines.append(f"{stage:8s} {r['seconds']:9.3f} {r['images_per_s']:9.1f} {fmt(r['tflop'], '9.3g')} "
                     f"{fmt(r['tflops'], '9.3g')} {fmt(r['mfu'], '7.2%')} {fmt(r['peak_gib'], '9.1f')}")
    return "\n".join(lines)


def main(argv=None):
    b, cfg = parse(sys.argv[1:] if argv is None else argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    f = count_flops(cfg)
    n = cfg.prompts_per_epoch * cfg.group_size
    print(f"{b.arch} {cfg.resolution}² | per GPU {cfg.prompts_per_epoch} prompts × {cfg.group_size} = {n} "
          f"images | sampling {n // cfg.sample_batch_size} batches × {cfg.num_steps} steps, forwards of "
          f"{f['sample_rows']} rows | training {n // cfg.train_batch_size} batches × "
          + (f"{nft.timesteps_per_image(cfg)} times (nft)" if cfg.objective == "nft" else
             f"{cfg.window_size} steps") + f", fwd+bwd of {f['train_rows']} rows")
    print(f"FLOPs: forward {f['forward_per_row'] / 1e12:.4g} T/row | training fwd+bwd = "
          f"{f['train_forward_backward'] / f['train_forward']:.2f} × forward | VAE decode "
          f"{f['decode_per_image'] / 1e12:.4g} T/image | DINO {f['dino_per_image'] / 1e12:.4g} T/image")
    fl = flops_per_epoch(cfg, f)
    print("TFLOP per epoch: " + " | ".join(f"{k} {v / 1e12:.4g}" for k, v in fl.items())
          + f" | total {sum(fl.values()) / 1e12:.4g} = {sum(fl.values()) / n / 1e12:.4g} per image")
    results = {"flops": f}
    if not b.count_only:
        variants = [("eager", False), ("compiled", True)] if b.eager_baseline else \
            [("compiled" if cfg.compile else "eager", cfg.compile)]
        for name, compiled in variants:
            try:
                results[name] = run(b, dataclasses.replace(cfg, compile=compiled), device, f)
                print(table(name, results[name]), flush=True)
            except torch.OutOfMemoryError as e:  # e.g. a larger resolution without checkpointing
                results[name] = dict(error=f"out of memory: {str(e).splitlines()[0]}")
                print(f"{name}: {results[name]['error']} (try --gradient_checkpointing or --low_mem)",
                      flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if all("stages" in results.get(k, {}) for k in ("eager", "compiled")):
            e, c = results["eager"]["stages"], results["compiled"]["stages"]
            print("compiled speed-up: "
                  + " | ".join(f"{k} ×{e[k]['seconds'] / c[k]['seconds']:.2f}" for k in e))
    results.update(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                   torch=torch.__version__,
                   date=time.strftime("%Y-%m-%d"), peak_tflops=b.peak_tflops, config=dataclasses.asdict(cfg),
                   argv=list(sys.argv[1:] if argv is None else argv))
    if b.out:
        with open(b.out, "w") as fh:
            json.dump(results, fh, indent=1)
    return results


if __name__ == "__main__":
    main()
