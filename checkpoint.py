"""
checkpoint.py — the checkpoints of a run, written so that nothing is lost or mixed, and read back exactly.

- `save`: `out_dir/checkpoints/epoch_N` (N = epochs done: the weights that enter epoch N, numbered as the
  held-out grid of those weights), written to `epoch_N.tmp` and renamed when complete. Every tensor is
  checked finite first (a refused save writes and deletes nothing); `manifest.json`, written last, lists
  each file's size and SHA-256; a full disk is one line and the previous checkpoint stays. Each holds the
  EMA LoRA in diffusers' format too (`lora/`, model.export_lora).
- `latest` / `verify` / `read`: the newest *intact* checkpoint; a damaged, truncated, stray or re-hashed
  but unusable one (a state.pt without its keys, tensors of the wrong shape, NaN) is skipped with a
  warning that names what is wrong.
- `load`, `load_weights`: restore a run exactly (or, for sample.py, its weights).

Leaves out: what is trained (model.py, reward.py), when to save (train.py), the run folder, its config.json
where a --resume starts and what it may change (outputs.py).
"""

import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil

import torch
from safetensors.torch import load_file, save_file

import model as M

MANIFEST = "manifest.json"
NAME = re.compile(r"^epoch_(\d{6})$")
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
    def write_json(obj, path):
        with open(path, "w") as f:
            json.dump(obj, f, indent=1)
    writers = [("trainable.safetensors", lambda p: save_file(tensors, p)),
               ("ema.safetensors", lambda p: save_file(ema, p)),
               *([("old.safetensors", lambda p: save_file(old, p))] if old is not None else []),  # nft
               ("state.pt", lambda p: torch.save(state, p)),
               *([("lora", lambda p: M.export_lora(gen, p))] if cfg.lora_rank > 0 else []),
               ("config.json", lambda p: write_json(dataclasses.asdict(cfg), p))]
    writing = tmp
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for name, write in writers:
            writing = os.path.join(tmp, name)
            write(writing)
        manifest = {n: dict(bytes=os.path.getsize(os.path.join(tmp, n)), sha256=_sha256(os.path.join(tmp, n)))
                    for n in _files(tmp)}
        writing = os.path.join(tmp, MANIFEST)
        write_json(manifest, writing)  # written last: its presence means complete
        for name in _files(tmp):  # flush file contents before the rename makes them visible
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        writing = final
        for name in users_files(final):  # saved again (resumed from an older one): a user's file stays
            if not os.path.exists(os.path.join(tmp, name)):
                os.renames(os.path.join(final, name), os.path.join(tmp, name))
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
    # prune the complete ones (a manifest) older than the newest keep_last, never one holding a user's file;
    # no re-hashing. Renamed epoch_N.pruned first: a kill while deleting leaves no half checkpoint.
    complete = [p for p in checkpoints(cfg.out_dir) if _manifest(p)[0] is not None]
    pruned = [p + ".pruned" for p in complete[:-cfg.keep_last] if not users_files(p)]
    for gone in [os.path.join(root, n) for n in os.listdir(root) if n.endswith(".pruned")]:
        shutil.rmtree(gone, ignore_errors=True)  # left by a kill
    for gone in pruned:
        os.rename(gone.removesuffix(".pruned"), gone)
        shutil.rmtree(gone, ignore_errors=True)
    return final


def ours(folder):
    """The files of checkpoint folder `folder` that a save wrote: what its manifest lists and the manifest
    (a half-written .tmp or half-deleted .pruned one: the names a save writes); none without a manifest."""
    listed = SAVED if folder.endswith((".tmp", ".pruned")) else _manifest(folder)[0]
    return [n for n in [*listed, MANIFEST] if os.path.isfile(os.path.join(folder, n))] if listed else []


def users_files(folder):
    """The files in checkpoint folder `folder` that no save wrote (a user's): never deleted."""
    return [n for n in (_files(folder) if os.path.isdir(folder) else []) if n not in set(ours(folder))]


def disk_full(e):
    """Whether exception `e` is a full disk (or quota): OSError ENOSPC / EDQUOT, or how torch.save and
    safetensors word it."""
    return (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
            or any(words in str(e) for words in ("unexpected pos", "No space left", "os error 28")))


def full_disk_message(path, out_dir):
    """The one line of a full disk: what was being written, and what a --resume would start from."""
    intact = latest(out_dir, warn=lambda msg: None)
    return (f"disk full while writing {path}; the last intact checkpoint is "
            f"{intact or 'none (nothing to --resume from yet)'}")


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
    w = {n: _tensors(path, f"{n}.safetensors") for n in ("trainable", "ema", "old")  # old: nft's
         if n != "old" or os.path.isfile(os.path.join(path, "old.safetensors"))}
    for name, tensors in w.items():  # save writes float32: another dtype is a file re-saved since
        if low := [k for k, v in tensors.items() if v.dtype != torch.float32]:
            raise Damaged(f"{name}.safetensors holds {tensors[low[0]].dtype} tensors ({low[0]}), not the "
                          "float32 a save writes")
    shapes = {k: v.shape for k, v in w["trainable"].items()}
    if not shapes or (empty := [k for k, v in shapes.items() if v.numel() == 0]):
        raise Damaged(f"trainable.safetensors holds {f'an empty tensor ({empty[0]})' if shapes else 'none'}")
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
        if bad := [k for k, v in s["counters"].items() if not (  # counts, and the health's running values
                v is None or type(v) is float if k.startswith("ref_sim") else type(v) is int and v >= 0)]:
            raise Damaged(f"state.pt's counter {bad[0]!r} is {s['counters'][bad[0]]!r}, not a count")
        named = NAME.match(os.path.basename(os.path.normpath(path)))
        if named and s["epoch"] != int(named.group(1)):  # resume_point goes by the folder's name
            raise Damaged(f"state.pt says {s['epoch']} epochs done, its folder {int(named.group(1))}")
        w["state"] = s
        try:
            w["config"] = json.load(open(os.path.join(path, "config.json")))
        except (OSError, ValueError) as e:
            raise Damaged(f"config.json cannot be read ({e})") from None
        if not isinstance(w["config"], dict):
            raise Damaged("config.json is not a run's config (a JSON object)")
        if w["config"].get("objective") == "nft" and "old" not in w:  # a GRPO one continued as nft has none
            raise Damaged("old.safetensors is missing (an nft run's old model)")
    for name, tree in w.items():
        if bad := nonfinite(tree):
            raise Damaged(f"{'state.pt' if name == 'state' else name + '.safetensors'} holds NaN or inf "
                          f"({bad[0]}{' …' if len(bad) > 1 else ''})")
    return w


def checked(path):
    """(None, all read() found) if checkpoint `path` can be resumed or evaluated, else (why not, None)."""
    if why := verify(path):
        return why, None
    try:
        return None, read(path)
    except Damaged as e:
        return str(e), None


def damaged(path):
    """Why checkpoint `path` cannot be resumed or evaluated (verify, then read), or None if it can."""
    return checked(path)[0]


def latest(out_dir, warn=print, weights=False):
    """The newest intact and readable checkpoint of `out_dir` or None; every newer damaged one is skipped
    with a warning. weights=True: (path, what read() found there), so that a resume reads it only once."""
    for path in reversed(checkpoints(out_dir)):
        why, w = checked(path)
        if why is None:
            return (path, w) if weights else path
        warn(f"WARNING skipping damaged checkpoint {path}: {why}")
    return (None, None) if weights else None


def load_weights(gen, path, w=None):
    """The trainable and EMA weights (and nft's old model) of checkpoint folder `path` into the
    model.Generator `gen`; returns the folder they came from. Weights that do not fit the model (another
    lora_rank, model or adapted layers) are refused in one line. A checkpoint that a live run pruned while
    it was being read is replaced by that run's newest intact one, with a warning."""
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


def load(path, gen, adversary, counters, cfg, w=None):
    """Restore checkpoint `path` into a built run from `w`, what latest(weights=True) read there (None: read
    it now); returns epochs done. The optimizers take the *current* cfg.lr and the adversary's own lr (a
    changed lr on --resume is applied, as config.json records)."""
    try:
        w = w or read(path, gen.device)
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
