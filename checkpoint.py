"""
checkpoint.py — what a run leaves on disk and how it comes back, without losing or mixing anything.

Owns
- `save`: a checkpoint folder `out_dir/checkpoints/epoch_N` (N = epochs done: the weights that enter epoch
  N, the same number as the held-out grid and summary of those weights), written to `epoch_N.tmp` and
  renamed only when complete. Every tensor is checked finite first (weights, EMA, optimizer, discriminator):
  a refused save writes nothing and deletes nothing. `manifest.json`, written last, lists each file's size
  and SHA-256. A full disk ends in one line, and the previous checkpoint stays.
- `latest` / `verify`: the newest *intact* checkpoint — a damaged, truncated or stray one is skipped with
  a warning that names what is wrong.
- `load`, `load_weights`, `config_changes`: restore a run exactly (or, for sample.py, its weights); say
  which keys changed since the checkpoint, and refuse the changes that make it another experiment.
- `claim_out_dir`: one run per folder (a lock file); a used folder is resumed or explicitly overwritten,
  never mixed.
- `open_metrics`: metrics.jsonl in append mode; a line torn by a kill is dropped, not fatal.
  `external_logger`: the same rows to wandb or tensorboard when asked for (neither is a dependency).
- `export_lora` / `load_lora`: the LoRA in diffusers' format, written into every checkpoint (its `lora/`);
  `init_lora` and sample.py's `--lora` read it back, or a PEFT adapter folder (the released Adv-GRPO and
  Flow-GRPO LoRAs), rank / alpha / target modules checked against the run's.

Leaves out: what is trained (model.py, reward.py) and when to save (train.py).
"""

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil

import numpy as np
import torch
from diffusers import StableDiffusion3Pipeline
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from PIL import Image
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
NAME = re.compile(r"^epoch_(\d{6})$")
# Keys that define the experiment: changing one on --resume makes the resumed run another experiment
# (refused unless allow_config_change). Any other change is printed and applied.
SAME_EXPERIMENT = ("pretrained", "t5", "max_sequence_length", "resolution", "lora_rank", "lora_alpha",
                   "train_prompts", "num_steps", "sde_kind", "group_size", "prompts_per_epoch", "reward",
                   "references", "reference_root", "schedule", "d_conditional", "dino_backbone",
                   "dino_weights", "dino_kwargs", "dino_image_size", "pickscore_model",
                   "pickscore_train_last_k", "seed", "objective")
RUN_FILES = ("metrics.jsonl", "checkpoints", "samples", "summary.json", "curves.png", "config.json",
             "tensorboard")  # what `overwrite` clears: only what a run writes


def nonfinite(tree, prefix=""):
    """Names of the tensors in a nested dict / list that hold NaN or inf."""
    if torch.is_tensor(tree):
        return [] if not tree.is_floating_point() or torch.isfinite(tree).all() else [prefix or "tensor"]
    items = (tree.items() if isinstance(tree, dict)
             else enumerate(tree) if isinstance(tree, (list, tuple)) else ())
    return [name for k, v in items for name in nonfinite(v, f"{prefix}.{k}" if prefix else str(k))]


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder):
    return sorted(os.path.relpath(os.path.join(d, n), folder)
                  for d, _, names in os.walk(folder) for n in names)


def save(cfg, epochs_done, gen, adversary, counters):
    """Write checkpoint `epoch_<epochs_done>` atomically; returns its path. Refuses (SystemExit, nothing
    written, nothing pruned) when any tensor is non-finite or the disk is full."""
    root = os.path.join(cfg.out_dir, "checkpoints")
    final = os.path.join(root, f"epoch_{epochs_done:06d}")
    tmp = final + ".tmp"
    tensors = {n: p.detach().float().cpu().contiguous() for n, p in gen.params.items()}
    ema = {n: t.cpu().contiguous() for n, t in gen.ema.state_dict().items()}
    old = getattr(gen, "old", None)  # objective = "nft": DiffusionNFT's old model
    old = {n: t.cpu().contiguous() for n, t in old.state_dict().items()} if old is not None else None
    state = dict(epoch=epochs_done, counters=dict(counters), config=dataclasses.asdict(cfg),
                 optimizer=gen.opt.state_dict(), rng_cpu=torch.get_rng_state())
    if adversary is not None:
        state["adversary"] = adversary.head_state()
    bad = nonfinite(dict(trainable=tensors, ema=ema, optimizer=state["optimizer"],
                         adversary=state.get("adversary"), old=old))
    if bad:
        raise SystemExit(f"refusing to save {final}: non-finite values in {', '.join(bad[:3])}"
                         f"{' …' if len(bad) > 3 else ''}; the checkpoints already on disk are kept")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_file(tensors, os.path.join(tmp, "trainable.safetensors"))
        save_file(ema, os.path.join(tmp, "ema.safetensors"))
        if old is not None:  # objective = "nft": the old model (nft.OldPolicy), the third set of weights
            save_file(old, os.path.join(tmp, "old.safetensors"))
        torch.save(state, os.path.join(tmp, "state.pt"))
        if cfg.lora_rank > 0:
            export_lora(gen, os.path.join(tmp, "lora"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)
        manifest = {name: dict(bytes=os.path.getsize(os.path.join(tmp, name)),
                               sha256=_sha256(os.path.join(tmp, name)))
                    for name in _files(tmp)}
        with open(os.path.join(tmp, MANIFEST), "w") as f:  # written last: its presence means complete
            json.dump(manifest, f, indent=1)
        for name in _files(tmp):  # flush file contents before the rename makes them visible
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        fd = os.open(root, os.O_RDONLY)  # make the rename itself durable
        os.fsync(fd)
        os.close(fd)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise SystemExit(f"no space left on device while saving {final}; nothing was written and the "
                             "checkpoints already on disk are kept") from None
        raise
    intact = [p for p in checkpoints(cfg.out_dir) if verify(p) is None]
    for old in intact[:-cfg.keep_last]:  # prune only intact ones older than the newest keep_last
        shutil.rmtree(old, ignore_errors=True)
    return final


def export_lora(gen, path):
    """The EMA LoRA in diffusers' format: `StableDiffusion3Pipeline.from_pretrained(base)
    .load_lora_weights(path)` then samples what our eval samples (a test checks it)."""
    tr = gen.transformer
    with gen.ema.applied(gen.params):
        layers = {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(tr).items()}
    # the metadata carries lora_alpha: without it diffusers assumes alpha = rank (a 2x wrong scale here)
    StableDiffusion3Pipeline.save_lora_weights(
        path, transformer_lora_layers=layers,
        transformer_lora_adapter_metadata=tr.peft_config["default"].to_dict())


def read_lora(folder, what="init_lora"):
    """A LoRA folder in either published format: diffusers' (`pytorch_lora_weights.safetensors`, keys
    "transformer.<module>.lora_A.weight", rank and alpha in its metadata) or PEFT's (`adapter_config.json` +
    `adapter_model.safetensors`, keys "base_model.model.<module>.lora_A.weight": the released Adv-GRPO and
    Flow-GRPO LoRAs). Returns (settings {r, lora_alpha, target_modules}, where each is None when the file
    does not say, weights {"<module>.lora_A.weight": tensor}); refuses what it cannot read in one line."""
    diffusers_file = os.path.join(folder, "pytorch_lora_weights.safetensors")
    config_file = os.path.join(folder, "adapter_config.json")
    where = config_file
    try:
        if os.path.isfile(diffusers_file):
            with safe_open(diffusers_file, "pt") as f:
                meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
            settings = {k: meta.get(f"transformer.{k}") for k in ("r", "lora_alpha", "target_modules")}
            prefix, weights_file = "transformer.", diffusers_file
        elif os.path.isfile(config_file):
            settings = json.load(open(config_file))
            if not isinstance(settings, dict):
                raise ValueError("not a JSON object")
            weights_file = os.path.join(folder, "adapter_model.safetensors")
            prefix = "base_model.model."
            unsupported = [k for k in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern",
                                       "modules_to_save", "layers_to_transform") if settings.get(k)]
            if settings.get("peft_type", "LORA") != "LORA" or unsupported:  # each changes the update's maths
                raise SystemExit(f"{what} {config_file}: a {settings.get('peft_type')} adapter with "
                                 f"{', '.join(unsupported) or 'another method'}; only plain LoRA loads")
        else:
            raise SystemExit(f"{what} {folder}: neither pytorch_lora_weights.safetensors (diffusers) nor "
                             "adapter_config.json + adapter_model.safetensors (PEFT) is there")
        where = weights_file
        weights = {k.removeprefix(prefix): v for k, v in load_file(weights_file).items()}
    except (OSError, ValueError, SafetensorError) as e:
        raise SystemExit(f"{what} {where} cannot be read: {type(e).__name__}: {str(e)[:160]}") from None
    targets = settings.get("target_modules")
    settings = dict(r=settings.get("r"), lora_alpha=settings.get("lora_alpha"),
                    target_modules=sorted([targets] if isinstance(targets, str) else targets or []) or None)
    return settings, weights


def load_lora(transformer, folder, what="init_lora"):
    """Set our adapter to a LoRA folder of either format (`read_lora`), refusing one of another rank,
    alpha or target modules, or with weights for other layers, in one line."""
    if not getattr(transformer, "peft_config", None):
        raise SystemExit(f"{what} needs lora_rank > 0")
    theirs, weights = read_lora(folder, what)
    ours = transformer.peft_config["default"]
    r, alpha = theirs["r"] or ours.r, theirs["lora_alpha"] or ours.lora_alpha
    if (r, alpha) != (ours.r, ours.lora_alpha):  # another alpha would silently rescale the update
        raise SystemExit(f"{what} {folder} has rank {r} / alpha {alpha}: "
                         f"set --lora_rank={r} --lora_alpha={alpha}")
    if theirs["target_modules"] and set(theirs["target_modules"]) != set(ours.target_modules):
        raise SystemExit(f"{what} {folder} adapts {theirs['target_modules']}, this run "
                         f"{sorted(ours.target_modules)} (model.LORA_TARGETS)")
    try:
        result = set_peft_model_state_dict(transformer, weights, adapter_name="default")
    except RuntimeError as e:  # shape mismatch: another rank than its metadata says
        raise SystemExit(f"{what} {folder} does not fit lora_rank / targets of this run: "
                         f"{str(e)[:200]}") from None
    if getattr(result, "unexpected_keys", None):
        raise SystemExit(f"{what} {folder} has weights for layers this run does not adapt, e.g. "
                         f"{result.unexpected_keys[0]}")
    missing = [k for k in getattr(result, "missing_keys", []) if ".lora_" in k]
    if missing:
        raise SystemExit(f"{what} {folder} has no weights for {len(missing)} adapted tensors, "
                         f"e.g. {missing[0]}")


def checkpoints(out_dir):
    """Every folder named like a checkpoint (epoch_NNNNNN), oldest first; intact or not."""
    root = os.path.join(out_dir, "checkpoints")
    names = sorted(n for n in os.listdir(root) if NAME.match(n)) if os.path.isdir(root) else []
    return [os.path.join(root, n) for n in names]


def verify(path):
    """None if the checkpoint at `path` is complete and unchanged since it was written, else why not."""
    try:
        manifest = json.load(open(os.path.join(path, MANIFEST)))
    except FileNotFoundError:
        return f"no {MANIFEST} (incomplete, or written by an older version)"
    except (ValueError, OSError) as e:
        return f"unreadable {MANIFEST} ({e})"
    for name, want in manifest.items():
        p = os.path.join(path, name)
        if not os.path.isfile(p):
            return f"{name} is missing"
        if os.path.getsize(p) != want["bytes"]:
            return f"{name} has {os.path.getsize(p)} bytes, {want['bytes']} were written"
        if _sha256(p) != want["sha256"]:
            return f"{name} differs from what was written (checksum)"
    return None


def latest(out_dir, warn=print):
    """The newest intact checkpoint of `out_dir` or None; every newer damaged one is skipped with a
    warning."""
    for path in reversed(checkpoints(out_dir)):
        why = verify(path)
        if why is None:
            return path
        warn(f"WARNING skipping damaged checkpoint {path}: {why}")
    return None


def config_changes(saved: dict, cfg, allow=False):
    """Lines describing each key that differs between a checkpoint's config and `cfg`. Refuses
    (SystemExit) a change of a SAME_EXPERIMENT key unless `allow`, and keys the current code does not know."""
    now = dataclasses.asdict(cfg)
    unknown = sorted(set(saved) - set(now))
    if unknown:
        raise SystemExit(f"--resume: the checkpoint's config has keys this version does not know: {unknown}")
    ignore = ("resume", "overwrite", "allow_config_change", "epochs")
    changed = [k for k in now if k not in ignore and k in saved and saved[k] != now[k]]
    lines = [f"  {k}: {saved[k]!r} → {now[k]!r}" for k in changed]
    fatal = [k for k in changed if k in SAME_EXPERIMENT]
    if fatal and not allow:
        raise SystemExit(f"--resume with {', '.join(fatal)} changed would be another experiment ("
                         f"{'; '.join(line.strip() for line in lines if line.split(':')[0].strip() in fatal)}"
                         "). Start a new out_dir, or pass --allow_config_change=True.")
    return lines


def load_weights(gen, path):
    """The trainable and EMA weights (and nft's old model) of checkpoint folder `path` into the
    model.Generator `gen`."""
    trainable = load_file(os.path.join(path, "trainable.safetensors"))
    with torch.no_grad():
        for n, p in gen.params.items():
            p.copy_(trainable[n])
    gen.ema.load_state_dict(load_file(os.path.join(path, "ema.safetensors")))
    if getattr(gen, "old", None) is not None:  # nft; a GRPO checkpoint continued as nft: θ_old = θ
        old = os.path.join(path, "old.safetensors")
        gen.old.load_state_dict(load_file(old) if os.path.isfile(old) else gen.params)


def load(path, gen, adversary, counters, cfg):
    """Restore a checkpoint into a built run; returns epochs done. The optimizers take the *current*
    cfg.lr and the adversary's own lr (a changed lr on --resume is applied, as config.json records)."""
    load_weights(gen, path)
    try:
        state = torch.load(os.path.join(path, "state.pt"), weights_only=True, map_location=gen.device)
    except Exception as e:  # weights_only refuses pickled code: say so instead of a traceback
        raise SystemExit(f"{path}/state.pt cannot be read safely: {type(e).__name__}: "
                         f"{str(e)[:200]}") from None
    gen.opt.load_state_dict(state["optimizer"])
    for group in gen.opt.param_groups:
        group["lr"] = cfg.lr
    counters.update(state["counters"])
    torch.set_rng_state(state["rng_cpu"].cpu())
    if adversary is not None and "adversary" in state:
        adversary.load_head_state(state["adversary"])  # its optimizer keeps adversary.lr
    return state["epoch"]


# -----------------------------------------------------------------------------------------------
# The run folder

_LOCKS = {}  # run folder -> its open, locked .lock file, held until the process ends


def claim_out_dir(cfg):
    """Make cfg.out_dir this run's own: refuse a file, a folder another live run is writing, or a used
    folder without --resume (--overwrite clears what a run writes there, nothing else)."""
    out = os.path.abspath(cfg.out_dir)
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"out_dir {out} is a file, not a folder")
    os.makedirs(out, exist_ok=True)
    if out not in _LOCKS:
        lock = open(os.path.join(out, ".lock"), "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise SystemExit(f"out_dir {out} is in use by another run (its .lock is held); wait for it or "
                             "pick another --out_dir") from None
        _LOCKS[out] = lock
    used = [n for n in RUN_FILES if os.path.exists(os.path.join(out, n))]
    if used and not cfg.resume:
        if not cfg.overwrite:
            raise SystemExit(f"out_dir {out} already holds a run ({', '.join(used)}): "
                             "--resume to continue it, --overwrite=True to clear it first, "
                             "or another --out_dir")
        for n in used:
            p = os.path.join(out, n)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)


def read_metrics(path, warn=print):
    """The JSON lines of metrics.jsonl; a torn line (a kill or a full disk mid-write) is dropped with a
    warning."""
    rows = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f.read().split(b"\n"), 1):
            text = raw.decode("utf-8", "replace").strip().strip("\x00")
            if not text:
                continue
            try:
                rows.append(json.loads(text))
            except ValueError:
                warn(f"WARNING {path}:{i}: dropped a torn line ({text[:60]!r})")
    return rows


def open_metrics(out_dir, start):
    """metrics.jsonl in append mode; on resume, keep only the lines of epochs before `start` (rewritten
    atomically), so redone epochs are not logged twice and a torn last line is gone."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if os.path.exists(path):
        keep = [r for r in read_metrics(path) if r.get("epoch", start) < start]
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)
        os.replace(path + ".tmp", path)
    return open(path, "a")


def external_logger(cfg):
    """log(stats, grid=None) for wandb / tensorboard, when asked for: the scalars of `stats`, and the held-out
    sample grid (a PNG path) when an evaluation made one. A clear stop when the package is not installed."""
    if not cfg.log_to:
        return lambda stats, grid=None: None
    try:
        if cfg.log_to == "wandb":
            import wandb
            run = wandb.init(project="nanoAdvGRPO", name=os.path.basename(cfg.out_dir.rstrip("/")),
                             config=dataclasses.asdict(cfg), resume="allow")

            def log(stats, grid=None):
                run.log({**stats, **({"samples": wandb.Image(grid)} if grid else {})}, step=stats["epoch"])
            return log
        if cfg.log_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(os.path.join(cfg.out_dir, "tensorboard"))

            def log(stats, grid=None):
                for k, v in stats.items():
                    if isinstance(v, (int, float)) and k != "epoch":
                        writer.add_scalar(k, v, stats["epoch"])
                if grid:
                    writer.add_image("samples", np.asarray(Image.open(grid).convert("RGB")), stats["epoch"],
                                     dataformats="HWC")
                writer.flush()  # an epoch is minutes long: flush, so a killed run loses nothing
            return log
    except ImportError as e:
        raise SystemExit(f"log_to={cfg.log_to!r} needs its package: pip install {cfg.log_to} ({e})") from None
    raise SystemExit(f"config error: log_to must be '', 'wandb' or 'tensorboard', got {cfg.log_to!r}")
