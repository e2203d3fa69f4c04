"""
checkpoint.py — what a run leaves on disk and how it comes back, without losing or mixing anything.

Owns
- `save`: a checkpoint folder `out_dir/checkpoints/epoch_N` (N = epochs done: the weights that enter epoch
  N, the same number as the held-out grid and summary of those weights), written to `epoch_N.tmp` and
  renamed only when complete. Every tensor is checked finite first (weights, EMA, optimizer, discriminator):
  a refused save writes nothing and deletes nothing. `manifest.json`, written last, lists each file's size
  and SHA-256. A full disk ends in one line, and the previous checkpoint stays.
- `latest` / `verify` / `read`: the newest *intact* checkpoint — a damaged, truncated, stray or re-hashed
  but unusable one (a state.pt without its keys, tensors of the wrong shape, NaN) is skipped with a warning
  that names what is wrong.
- `resume_point`, `load`, `load_weights`, `config_changes`: restore a run exactly (or, for sample.py, its
  weights); say which keys changed since the checkpoint, and refuse the changes that make it another
  experiment; a finished run says so and exits 0.
- `claim_out_dir`: one run per folder (a lock file); a used folder is resumed or explicitly overwritten,
  never mixed; `--overwrite` removes only the files a run of ours wrote, never a user's.
- `open_metrics`: metrics.jsonl in append mode; a line torn by a kill is dropped, not fatal; a full disk
  is one line.
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
# Keys that change the shapes of the trained tensors: no checkpoint can continue under another value
SHAPES = ("lora_rank", "d_hidden")
RUN_FILES = ("metrics.jsonl", "checkpoints", "samples", "summary.json", "curves.png", "config.json",
             "tensorboard")  # the names that mark a folder as used by a run
# The files a run writes in out_dir itself, beside samples/epoch_N.png, tensorboard/events.out.tfevents.*
# and the checkpoints
REPORT = ("config.json", "config.json.tmp", "metrics.jsonl", "metrics.jsonl.tmp", "summary.json",
          "curves.png")
SAVED = ("trainable.safetensors", "ema.safetensors", "old.safetensors", "state.pt", "config.json",
         os.path.join("lora", "pytorch_lora_weights.safetensors"))  # what `save` writes in a checkpoint
STATE = dict(epoch=int, counters=dict, config=dict, optimizer=dict, rng_cpu=torch.Tensor)  # state.pt's keys


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
    old = gen.old  # objective = "nft": DiffusionNFT's old model
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
    writing = tmp
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        writing = os.path.join(tmp, "trainable.safetensors")
        save_file(tensors, writing)
        writing = os.path.join(tmp, "ema.safetensors")
        save_file(ema, writing)
        if old is not None:  # objective = "nft": the old model (model.Shadow), the third set of weights
            writing = os.path.join(tmp, "old.safetensors")
            save_file(old, writing)
        writing = os.path.join(tmp, "state.pt")
        torch.save(state, writing)
        if cfg.lora_rank > 0:
            writing = os.path.join(tmp, "lora")
            export_lora(gen, writing)
        writing = os.path.join(tmp, "config.json")
        with open(writing, "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)
        manifest = {name: dict(bytes=os.path.getsize(os.path.join(tmp, name)),
                               sha256=_sha256(os.path.join(tmp, name)))
                    for name in _files(tmp)}
        writing = os.path.join(tmp, MANIFEST)
        with open(writing, "w") as f:  # written last: its presence means complete
            json.dump(manifest, f, indent=1)
        for name in _files(tmp):  # flush file contents before the rename makes them visible
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        writing = final
        keep_users_files(final, tmp, cfg.out_dir)  # saved again (resumed from an older one): a user's file stays
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        fd = os.open(root, os.O_RDONLY)  # make the rename itself durable
        os.fsync(fd)
        os.close(fd)
    except Exception as e:  # torch.save's full disk is a RuntimeError ("unexpected pos"), not an OSError
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(e):
            raise SystemExit(full_disk_message(writing, cfg.out_dir) + f"; {tmp} was removed") from None
        raise
    intact = [p for p in checkpoints(cfg.out_dir) if verify(p) is None]
    ours = set(our_files(cfg.out_dir))
    for old in intact[:-cfg.keep_last]:  # prune only intact ones older than the newest keep_last,
        if all(os.path.join(old, n) in ours for n in _files(old)):  # and never one holding a user's file
            shutil.rmtree(old, ignore_errors=True)
    return final


def keep_users_files(final, tmp, out_dir):
    """Before checkpoint folder `final` is replaced by `tmp`: move into `tmp` every file of `final` that
    this project did not write (our_files), so that replacing a checkpoint never deletes a user's file."""
    ours = set(our_files(out_dir))
    for name in _files(final) if os.path.isdir(final) else []:
        src, dst = os.path.join(final, name), os.path.join(tmp, name)
        if src not in ours and not os.path.exists(dst):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.replace(src, dst)


def disk_full(e):
    """Whether exception `e` is a full disk (or quota): OSError ENOSPC / EDQUOT, or how torch.save and
    safetensors word it."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return "unexpected pos" in text or "No space left" in text or "os error 28" in text


def full_disk_message(path, out_dir):
    """The one line of a full disk: what was being written, and what a --resume would start from."""
    intact = latest(out_dir, warn=lambda msg: None)
    return (f"disk full while writing {path}; the last intact checkpoint is "
            f"{intact or 'none (nothing to --resume from yet)'}")


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


def lora_settings(folder, what="init_lora"):
    """(rank, alpha, target modules or None) of a LoRA folder: its own config, else the weights' shapes
    (rank) and diffusers' assumption alpha = rank."""
    theirs, weights = read_lora(folder, what)
    ranks = {v.shape[0] for k, v in weights.items() if ".lora_A." in k}
    if not (theirs["r"] or ranks):
        raise SystemExit(f"{what} {folder}: no rank in its config and no lora_A weights")
    rank = theirs["r"] or max(ranks)
    if not (isinstance(rank, int) and rank > 0) or not (theirs["lora_alpha"] is None or (
            isinstance(theirs["lora_alpha"], (int, float)) and theirs["lora_alpha"] > 0)):
        raise SystemExit(f"{what} {folder}: rank {rank!r} / lora_alpha {theirs['lora_alpha']!r} must be "
                         "positive numbers (an integer rank)")
    return rank, theirs["lora_alpha"] or rank, theirs["target_modules"]


def adopt_lora(cfg, master=True):
    """init_lora: the run's LoRA becomes the adapter's (its rank, alpha and target modules), said once."""
    rank, alpha, targets = lora_settings(cfg.init_lora)
    targets = sorted(targets) if targets else cfg.lora_targets
    if (rank, alpha, targets) != (cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets):
        cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets = rank, alpha, targets
        if master:
            print(f"init_lora {cfg.init_lora}: its rank {rank}, alpha {alpha}, targets "
                  f"{targets or 'the recipe'} are this run's", flush=True)


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
                         f"{sorted(ours.target_modules)}: --lora_targets=\"{theirs['target_modules']}\"")
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


def _manifest(path):
    """(the manifest of checkpoint folder `path` as {file: {bytes, sha256}}, None) or (None, why not)."""
    try:
        manifest = json.load(open(os.path.join(path, MANIFEST)))
    except FileNotFoundError:
        return None, f"no {MANIFEST} (incomplete, or written by an older version)"
    except (ValueError, OSError) as e:
        return None, f"unreadable {MANIFEST} ({e})"
    if not isinstance(manifest, dict) or not all(
            isinstance(w, dict) and isinstance(w.get("bytes"), int) and isinstance(w.get("sha256"), str)
            for w in manifest.values()):
        return None, f"{MANIFEST} is not a map of file name → {{bytes, sha256}}"
    if missing := [n for n in ("trainable.safetensors", "ema.safetensors", "state.pt", "config.json")
                   if n not in manifest]:  # what every save writes
        return None, f"{MANIFEST} does not list {missing[0]}"
    if outside := [n for n in manifest if os.path.isabs(n) or os.path.normpath(n).startswith("..")]:
        return None, f"{MANIFEST} names a file outside the checkpoint ({outside[0]})"
    return manifest, None


def verify(path):
    """None if the checkpoint at `path` is complete and unchanged since it was written, else why not."""
    manifest, why = _manifest(path)
    if why:
        return why
    for name, want in manifest.items():
        p = os.path.join(path, name)
        if not os.path.isfile(p):
            return f"{name} is missing"
        if os.path.getsize(p) != want["bytes"]:
            return f"{name} has {os.path.getsize(p)} bytes, {want['bytes']} were written"
        try:
            if _sha256(p) != want["sha256"]:
                return f"{name} differs from what was written (checksum)"
        except OSError as e:
            return f"{name} cannot be read ({e.strerror})"
    return None


class Damaged(Exception):
    """A checkpoint that cannot be used; the message is one line naming the file and what is wrong."""


def _tensors(path, name):
    try:
        return load_file(os.path.join(path, name))
    except FileNotFoundError:
        raise Damaged(f"{name} is missing") from None
    except Exception as e:  # a zero-byte or truncated file: safetensors' own error, no traceback
        raise Damaged(f"{name} is not a readable safetensors file ({type(e).__name__}: {str(e)[:120]})") \
            from None


def read(path, device="cpu", state=True):
    """Everything checkpoint folder `path` holds, {trainable, ema, old (nft), state}, checked before any of it
    reaches a model: readable files, the keys of state.pt, the same tensors in each set of weights, no
    empty tensor, nothing NaN or inf. Raises Damaged (one line, naming the file). `state`=False: the
    weights alone (what an evaluation needs)."""
    w = dict(trainable=_tensors(path, "trainable.safetensors"), ema=_tensors(path, "ema.safetensors"))
    if os.path.isfile(os.path.join(path, "old.safetensors")):
        w["old"] = _tensors(path, "old.safetensors")
    shapes = {k: v.shape for k, v in w["trainable"].items()}
    if not shapes or (empty := [k for k, v in shapes.items() if v.numel() == 0]):
        raise Damaged("trainable.safetensors holds "
                      f"{f'an empty tensor ({empty[0]})' if shapes else 'nothing'}")
    for name in ("ema", "old"):
        if name in w and {k: v.shape for k, v in w[name].items()} != shapes:
            raise Damaged(f"trainable.safetensors and {name}.safetensors hold different tensors (names or "
                          "shapes)")
    if state:
        try:
            s = torch.load(os.path.join(path, "state.pt"), weights_only=True, map_location=device)
        except FileNotFoundError:
            raise Damaged("state.pt is missing") from None
        except Exception as e:  # weights_only refuses pickled code: say so instead of a traceback
            raise Damaged(f"state.pt cannot be read safely: {type(e).__name__}: {str(e)[:200]}") from None
        if bad := [k for k, kind in STATE.items()
                   if not isinstance(s, dict) or not isinstance(s.get(k), kind)]:
            raise Damaged(f"state.pt lacks {bad[0]!r} (or it is not a {STATE[bad[0]].__name__})")
        w["state"] = s
        try:
            w["config"] = json.load(open(os.path.join(path, "config.json")))
        except (OSError, ValueError) as e:
            raise Damaged(f"config.json cannot be read ({e})") from None
        if not isinstance(w["config"], dict):
            raise Damaged("config.json is not a run's config (a JSON object)")
    for name, tree in w.items():
        if bad := nonfinite(tree):
            raise Damaged(f"{'state.pt' if name == 'state' else name + '.safetensors'} holds NaN or inf "
                          f"({bad[0]}{' …' if len(bad) > 1 else ''})")
    return w


# The checkpoint damaged() has just read whole and found intact, kept for load(): a resume reads it once
# (at SD3.5-M with full fine-tuning that is tens of GB). One slot, keyed by the files' sizes and times, so a
# checkpoint written again since is read again.
_READ = {}


def _fingerprint(path):
    return path, tuple((n, (s := os.stat(os.path.join(path, n))).st_size, s.st_mtime_ns) for n in _files(path))


def _take(path):
    """The read of checkpoint `path` that damaged() kept, if its files have not changed since; else None."""
    key, w = next(iter(_READ.items()), (None, None))
    _READ.clear()
    return w if key is not None and os.path.isdir(path) and key == _fingerprint(path) else None


def damaged(path):
    """Why checkpoint `path` cannot be resumed or evaluated (verify, then read), or None if it can."""
    if why := verify(path):
        return why
    _READ.clear()
    try:
        _READ[_fingerprint(path)] = read(path)
    except Damaged as e:
        return str(e)
    return None


def latest(out_dir, warn=print):
    """The newest intact and readable checkpoint of `out_dir` or None; every newer damaged one is skipped
    with a warning."""
    for path in reversed(checkpoints(out_dir)):
        why = damaged(path)
        if why is None:
            return path
        warn(f"WARNING skipping damaged checkpoint {path}: {why}")
    return None


def config_changes(saved: dict, cfg, allow=False):
    """Lines describing each key that differs between a checkpoint's config and `cfg`. Refuses
    (SystemExit) a change of a SAME_EXPERIMENT key unless `allow`, of a SHAPES key always, and keys the
    current code does not know."""
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
    for k in changed:
        if k in SHAPES:
            raise SystemExit(f"--resume with {k} {saved[k]!r} → {now[k]!r}: the checkpoint's trained tensors "
                             "have other shapes, so no run can continue it, even with "
                             "--allow_config_change; start a new out_dir")
    return lines


def finished(cfg):
    """Whether cfg.out_dir holds the end-of-run report of cfg.epochs: the final evaluation's row in
    metrics.jsonl, then curves.png (and summary.json, once there are two evaluations) written after it."""
    if not cfg.eval_every:
        return True  # no evaluation, no report: the last checkpoint is the end
    path = os.path.join(cfg.out_dir, "metrics.jsonl")
    rows = read_metrics(path, warn=lambda msg: None) if os.path.isfile(path) else []
    evals = [r for r in rows if any(str(k).startswith("eval/") for k in r)]
    report = ["curves.png"] + (["summary.json"] if len(evals) >= 2 else [])
    return (any(r.get("epoch") == cfg.epochs for r in evals)
            and all(os.path.isfile(p) and os.path.getmtime(p) >= os.path.getmtime(path)
                    for p in (os.path.join(cfg.out_dir, n) for n in report)))


def resume_point(cfg, master=True):
    """--resume: the newest intact checkpoint of cfg.out_dir (newer damaged ones skipped with a warning),
    after the keys changed since it are printed and checked (config_changes). A run that is already
    finished (its epochs done and its final report written) says so and exits 0."""
    say = print if master else (lambda msg: None)
    path = latest(cfg.out_dir, warn=say)
    if path is None:
        raise SystemExit(f"--resume: no intact checkpoint in {cfg.out_dir}/checkpoints")
    changes = config_changes(json.load(open(os.path.join(path, "config.json"))), cfg, cfg.allow_config_change)
    if changes:
        say("\n".join([f"--resume: changed since {path}:", *changes]))
    done = int(NAME.match(os.path.basename(path)).group(1))
    if done > cfg.epochs or done == cfg.epochs and finished(cfg):
        say(f"--resume: {cfg.out_dir} is finished ({done} epochs done, epochs = {cfg.epochs}"
            f"{', final report written' if done == cfg.epochs else ''}): nothing to do; give "
            f"--epochs={done + 1} or more to train it further")
        raise SystemExit(0)
    return path


def load_weights(gen, path, w=None):
    """The trainable and EMA weights (and nft's old model) of checkpoint folder `path` into the
    model.Generator `gen`; returns the folder they came from. Weights that do not fit the model (another
    lora_rank, model or adapted layers) are refused in one line. A checkpoint that a live run pruned while
    it was being read is replaced by that run's newest intact one, with a warning."""
    w = w or _take(path)  # latest() may have just read it
    if w is None:
        try:
            w = read(path, gen.device, state=False)
        except Damaged as e:
            root = os.path.dirname(os.path.abspath(path))
            run = os.path.dirname(root)
            if os.path.isdir(path) or os.path.basename(root) != "checkpoints":
                raise SystemExit(f"{path}: {e}") from None
            newest = latest(run, warn=lambda msg: None)
            if newest is None:
                raise SystemExit(f"{path} was removed while it was being read (a live run prunes its older "
                                 f"checkpoints) and {run} has no intact checkpoint left") from None
            print(f"WARNING {path} was removed while it was being read (pruned by the live run): loading "
                  f"its newest intact checkpoint {newest} instead")
            return load_weights(gen, newest)
    mine = {n: tuple(p.shape) for n, p in gen.params.items()}
    theirs = {n: tuple(t.shape) for n, t in w["trainable"].items()}
    if mine != theirs:
        n = next((n for n in mine if theirs.get(n) != mine[n]), None) or sorted(set(theirs) - set(mine))[0]
        raise SystemExit(f"{path}/trainable.safetensors: its weights do not fit this run's model: {n} is "
                         f"{list(theirs[n]) if n in theirs else 'absent'} there, "
                         f"{list(mine[n]) if n in mine else 'absent'} here (another lora_rank, model or "
                         "adapted layers)")
    with torch.no_grad():
        for n, p in gen.params.items():
            p.copy_(w["trainable"][n])
    gen.ema.load_state_dict(w["ema"])
    if gen.old is not None:  # nft; a GRPO checkpoint continued as nft: θ_old = θ
        gen.old.load_state_dict(w.get("old", gen.params))
    return path


def load(path, gen, adversary, counters, cfg):
    """Restore a checkpoint into a built run; returns epochs done. The optimizers take the *current*
    cfg.lr and the adversary's own lr (a changed lr on --resume is applied, as config.json records)."""
    try:  # read and checked by latest() a moment ago, as a rule (its CPU copy: every load below copies)
        w = _take(path) or read(path, gen.device)
    except Damaged as e:
        raise SystemExit(f"{path}: {e}") from None
    load_weights(gen, path, w)
    state = w["state"]
    try:
        gen.opt.load_state_dict(state["optimizer"])
        for group in gen.opt.param_groups:
            group["lr"] = cfg.lr
        counters.update(state["counters"])
        torch.set_rng_state(state["rng_cpu"].cpu())
        if adversary is not None and "adversary" in state:
            adversary.load_head_state(state["adversary"])  # its optimizer keeps adversary.lr
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise SystemExit(f"{path}/state.pt does not fit this run (its optimizer or adversary state: "
                         f"{type(e).__name__}: {str(e)[:160]})") from None
    return state["epoch"]


# -----------------------------------------------------------------------------------------------
# The run folder

_LOCKS = {}  # run folder -> its open, locked .lock file, held until the process ends


def claim_out_dir(cfg):
    """Make cfg.out_dir this run's own: refuse a file, a folder that holds the working directory or this
    code, a folder another live run is writing, or a used folder without --resume; --overwrite removes
    the files a run of ours wrote there (our_files), nothing else, and is refused on a folder holding no
    run of ours."""
    if not cfg.out_dir.strip():
        raise SystemExit("out_dir is empty: give the run a folder of its own, e.g. --out_dir=out/my_run")
    out = os.path.abspath(cfg.out_dir)
    real = os.path.realpath(out)
    for mine in (os.getcwd(), os.path.dirname(os.path.abspath(__file__))):
        if os.path.commonpath([os.path.realpath(mine), real]) == real:
            raise SystemExit(f"out_dir {cfg.out_dir!r} is {real}, which holds {os.path.realpath(mine)}: a "
                             "run would write among your files; give it a folder of its own, e.g. "
                             "--out_dir=out/my_run")
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"out_dir {out} is a file, not a folder")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:  # below a file, under /proc, read-only, ...
        raise SystemExit(f"out_dir {out} cannot be made: {e.strerror} ({e.filename})") from None
    if out not in _LOCKS:
        lock = open(os.path.join(out, ".lock"), "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise SystemExit(f"out_dir {out} is in use by another run (its .lock is held); wait for it or "
                             "pick another --out_dir") from None
        _LOCKS[out] = lock
    for n in RUN_FILES:  # something else in the place of a run's file or folder: say so now, not mid-run
        p = os.path.join(out, n)
        if os.path.exists(p) and os.path.isdir(p) != (n in ("checkpoints", "samples", "tensorboard")):
            raise SystemExit(f"{p} is a {'folder' if os.path.isdir(p) else 'file'}, where a run keeps its "
                             f"{n}: move it away, or pick another --out_dir")
    used = [n for n in RUN_FILES if os.path.exists(os.path.join(out, n))]
    if used and not cfg.resume:
        if not cfg.overwrite:
            raise SystemExit(f"out_dir {out} already holds a run ({', '.join(used)}): "
                             "--resume to continue it, --overwrite=True to clear it first, "
                             "or another --out_dir")
        if not our_run(out):
            raise SystemExit(f"--overwrite: out_dir {out} holds no run of this project (its "
                             f"{', '.join(used)} are not ours: no config.json written by train.py, no "
                             f"checkpoint with our {MANIFEST}); nothing was deleted: pick another --out_dir")
        for f in our_files(out):
            os.remove(f)
            d = os.path.dirname(f)
            while d != out and not os.listdir(d):  # a folder left empty goes; one with a user's file stays
                os.rmdir(d)
                d = os.path.dirname(d)


def our_run(out):
    """Whether folder `out` holds a run of this project: its config.json as train.py writes it, or (no
    readable config.json there) a checkpoint with our manifest."""
    try:
        saved = json.load(open(os.path.join(out, "config.json")))
        return isinstance(saved, dict) and set(saved) >= {"out_dir", "save_every", "keep_last",
                                                          "allow_config_change"}
    except (OSError, ValueError):  # none, or torn: the checkpoints decide
        return any(_manifest(p)[0] is not None for p in checkpoints(out))


def our_files(out):
    """The files a run of this project wrote in folder `out` (what --overwrite removes): its own names in
    out_dir (REPORT), the grids samples/epoch_N.png, tensorboard's event files, and in each checkpoint
    what its manifest lists (in a half-written epoch_N.tmp, the names `save` writes). A user's other
    files, in any of these folders, are never among them."""
    def matching(folder, pattern):
        names = os.listdir(folder) if os.path.isdir(folder) else []
        return [os.path.join(folder, n) for n in sorted(names) if re.match(pattern, n)]
    files = [os.path.join(out, n) for n in REPORT]
    files += matching(os.path.join(out, "samples"), r"^epoch_\d{6}\.png$")
    files += matching(os.path.join(out, "tensorboard"), r"^events\.out\.tfevents\.")
    for p in matching(os.path.join(out, "checkpoints"), r"^epoch_\d{6}(\.tmp)?$"):
        if p.endswith(".tmp"):  # a save killed half-way: only the names it writes
            listed = [*SAVED, MANIFEST]
        else:
            manifest = _manifest(p)[0]
            listed = [*manifest, MANIFEST] if manifest else []  # no manifest of ours: not ours to delete
        files += [os.path.join(p, n) for n in listed]
    return [f for f in files if os.path.isfile(f)]


def read_metrics(path, warn=print):
    """The rows (JSON objects) of metrics.jsonl; a torn line (a kill or a full disk mid-write) or one that
    is not an object is dropped with a warning. A folder in its place is refused in one line."""
    if os.path.isdir(path):
        raise SystemExit(f"{path} is a folder, not a run's metrics file")
    rows = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f.read().split(b"\n"), 1):
            text = raw.decode("utf-8", "replace").strip().strip("\x00")
            if not text:
                continue
            try:
                row = json.loads(text)
            except ValueError:
                warn(f"WARNING {path}:{i}: dropped a torn line ({text[:60]!r})")
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                warn(f"WARNING {path}:{i}: dropped a line that is not a JSON object ({text[:60]!r})")
    return rows


def guarded(path, out_dir, write):
    """write() — a write of `path` in run folder `out_dir` — with a full disk turned into one line."""
    try:
        return write()
    except OSError as e:
        if disk_full(e):
            raise SystemExit(full_disk_message(path, out_dir)) from None
        raise


def write_config(cfg):
    """out_dir/config.json, the whole config: replaced atomically, since --resume starts from it."""
    path = os.path.join(cfg.out_dir, "config.json")

    def write():
        with open(path + ".tmp", "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)
        os.replace(path + ".tmp", path)
    guarded(path, cfg.out_dir, write)


class Metrics:
    """metrics.jsonl open for appending: `write(row)` adds one JSON line and flushes it (an epoch is minutes
    long: a kill loses nothing); a full disk is one line naming the file and the last intact checkpoint."""

    def __init__(self, path, out_dir):
        self.path, self.out_dir = path, out_dir
        self.file = guarded(path, out_dir, lambda: open(path, "a"))

    def write(self, row):
        guarded(self.path, self.out_dir, lambda: (self.file.write(json.dumps(row) + "\n"), self.file.flush()))


def open_metrics(out_dir, start):
    """metrics.jsonl (a Metrics); on resume, keep only the lines of epochs before `start` (rewritten
    atomically), so redone epochs are not logged twice and a torn last line is gone."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if os.path.exists(path):
        keep = [r for r in read_metrics(path) if isinstance(r.get("epoch"), int) and r["epoch"] < start]

        def rewrite():
            with open(path + ".tmp", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in keep)
            os.replace(path + ".tmp", path)
        guarded(path, out_dir, rewrite)
    return Metrics(path, out_dir)


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
