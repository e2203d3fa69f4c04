"""
outputs.py — a run's folder: claiming it (one run per folder, a lock, --overwrite that removes only what a
run of ours wrote), and what the run writes there besides its checkpoints — config.json, metrics.jsonl
(a line per epoch; a line torn by a kill is dropped, not fatal) and, when asked for, the same rows to
wandb or tensorboard (neither is a dependency). A full disk is one line naming the last intact checkpoint.

Leaves out: the checkpoints themselves (checkpoint.py), reading metrics.jsonl (eval.read_metrics), the
report drawn from it (eval.report).
"""
import dataclasses
import fcntl
import json
import os
import re

import numpy as np
from PIL import Image

import checkpoint as C
import configurator
import eval as E

# The names that mark a folder as used by a run
RUN_FILES = ("metrics.jsonl", "checkpoints", "samples", "summary.json", "curves.png", "config.json",
             "tensorboard")
# The files a run writes in out_dir itself, beside samples/epoch_N.png, tensorboard/events.out.tfevents.*
# and the checkpoints
REPORT = ("config.json", "config.json.tmp", "metrics.jsonl", "metrics.jsonl.tmp", "summary.json",
          "curves.png")

# What sample.py writes in an evaluation folder (<run>/eval/epoch_N[-hash]/, and its lora/ copy)
EVAL_FILES = r"^(\d{4,}\.png|grid\.png|metrics\.json|reproduce\.(py|json)|lora)$"
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
    code = os.path.dirname(os.path.abspath(__file__))  # the project's own folders, and the folders it reads
    source = [os.path.realpath(os.path.join(code, d)) for d in ("config", "assets", "tests", "docs")]
    inputs = [os.path.realpath(p if os.path.isdir(p) else os.path.dirname(os.path.abspath(p)))
              for p in (cfg.references, cfg.train_prompts, cfg.test_prompts) if p]
    if real in inputs or any(os.path.commonpath([s, real]) == s for s in source):
        raise SystemExit(f"out_dir {cfg.out_dir!r} is {real}: a folder of the project's source or one the "
                         "run reads (references, prompts); give it one of its own, e.g. --out_dir=out/my_run")
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"out_dir {out} is a file, not a folder")
    made, fresh = not os.path.isdir(out), not os.path.exists(os.path.join(out, ".lock"))
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
    try:
        for n in RUN_FILES:  # something else where a run keeps a file or folder: said now, not mid-run
            p = os.path.join(out, n)
            if os.path.exists(p) and os.path.isdir(p) != (n in ("checkpoints", "samples", "tensorboard")):
                raise SystemExit(f"{p} is a {'folder' if os.path.isdir(p) else 'file'}, where a run keeps "
                                 f"its {n}: move it away, or pick another --out_dir")
        used = [n for n in RUN_FILES if os.path.exists(os.path.join(out, n))]
        if used and not cfg.resume:
            if not cfg.overwrite:
                raise SystemExit(f"out_dir {out} already holds a run ({', '.join(used)}): "
                                 "--resume to continue it, --overwrite=True to clear it first, "
                                 "or another --out_dir")
            if not our_run(out):
                raise SystemExit(f"--overwrite: out_dir {out} holds no run of this project (its "
                                 f"{', '.join(used)} are not ours: no config.json written by train.py, no "
                                 f"checkpoint with our {C.MANIFEST}); nothing was deleted: "
                                 "pick another --out_dir")
            for f in our_files(out):
                os.remove(f)
                d = os.path.dirname(f)
                while d != out and not os.listdir(d):  # a folder left empty goes; a user's file stays
                    os.rmdir(d)
                    d = os.path.dirname(d)
    except SystemExit:  # refused: no .lock (nor folder) of ours is left in the user's place
        if fresh:
            _LOCKS.pop(out).close()
            os.remove(os.path.join(out, ".lock"))
            if made and not os.listdir(out):
                os.rmdir(out)
        raise


def our_run(out):
    """Whether folder `out` holds a run of this project: its config.json as train.py writes it, or (no
    readable config.json there) a checkpoint with our manifest."""
    try:
        return C.is_run_config(json.load(open(os.path.join(out, "config.json"))))
    except (OSError, ValueError):  # none, or torn: the checkpoints decide
        return any(C._manifest(p)[0] is not None for p in C.checkpoints(out))


def our_files(out):
    """The files a run of this project wrote in folder `out` (what --overwrite removes): its own names in
    out_dir (REPORT), the grids samples/epoch_N.png, tensorboard's event files, and in each checkpoint
    what its manifest lists (checkpoint.ours). A user's other files, in any of these folders, are never
    among them."""
    def matching(folder, pattern):
        names = os.listdir(folder) if os.path.isdir(folder) else []
        return [os.path.join(folder, n) for n in sorted(names) if re.match(pattern, n)]
    files = [os.path.join(out, n) for n in REPORT]
    files += matching(os.path.join(out, "samples"), r"^epoch_\d{6}\.png$")
    files += matching(os.path.join(out, "tensorboard"), r"^events\.out\.tfevents\.")
    files += [os.path.join(p, n) for p in matching(os.path.join(out, "checkpoints"),
                                                   r"^epoch_\d{6}(\.tmp|\.pruned)?$") for n in C.ours(p)]
    for ev in matching(os.path.join(out, "eval"), r"^epoch_\d{6}(-[0-9a-f]{8})?$"):  # sample.py's, of the run
        files += matching(ev, EVAL_FILES)
        files += [os.path.join(d, n) for d, _, names in os.walk(os.path.join(ev, "lora")) for n in names]
    return [f for f in files if os.path.isfile(f)]


def guarded(path, out_dir, write):
    """write() — a write of `path` in run folder `out_dir` — with a full disk turned into one line."""
    try:
        return write()
    except OSError as e:
        if C.disk_full(e):
            raise SystemExit(C.full_disk_message(path, out_dir)) from None
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
    """metrics.jsonl (a Metrics); on resume, keep only the lines of epochs before `start`, in increasing
    epoch order (rewritten atomically), so redone epochs are not logged twice, and a torn, foreign or
    repeated line is gone."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if os.path.exists(path):
        keep = []
        for r in E.read_metrics(path):
            if isinstance(r.get("epoch"), int) and (keep[-1]["epoch"] if keep else -1) < r["epoch"] < start:
                keep.append(r)

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


# -----------------------------------------------------------------------------------------------
# What the run prints

def announce(cfg, world, prompts, gen, resume_from, start):
    """What rank 0 says before the first epoch. The whole config goes to out_dir/config.json; stdout gets
    the keys that differ from the defaults (the paper's recipe) and the batch arithmetic."""
    write_config(cfg)  # what --resume starts from
    default = dataclasses.asdict(configurator.parse_args([]))
    changed = [f"{k}={v!r}" for k, v in dataclasses.asdict(cfg).items() if v != default[k]]
    print(f"config ({cfg.out_dir}/config.json); differs from the paper's recipe in: "
          f"{', '.join(changed) or '-'}")
    if resume_from:
        print(f"resumed from {resume_from} ({start} epochs done; next: epoch {start + 1}/{cfg.epochs})")
    n = cfg.prompts_per_epoch * cfg.group_size
    print(f"world {world} | {cfg.prompts_per_epoch} prompts × {cfg.group_size} images = {n} images/epoch "
          f"({n // world} per rank) | {len(prompts)} training prompts | trainable params "
          f"{sum(p.numel() for p in gen.params.values()):,} of "
          f"{sum(p.numel() for p in gen.transformer.parameters()):,}",
          flush=True)


def epoch_line(s):
    """The one stdout line per epoch, numbered by epochs done (as evaluations and checkpoints are)."""
    line = (f"epoch {s['epoch'] + 1:4d}/{s['epochs']} | steps so far G {s['g_steps']} D {s['d_steps']} | "
            f"reward {s['reward_mean']:+.4f} ± {s['reward_std']:.4f}")
    for key, name, fmt in (("d_real", "| ref", "+.3f"), ("d_fake", "gen", "+.3f"), ("d_acc", "D acc", ".2f"),
                           ("d_signal", "signal", ".2f")):  # what the adversary reported
        line += f" {name} {s[key]:{fmt}}" if key in s else ""
    if "clipfrac" in s and s.get("updates_per_epoch") == 1:  # every ratio is 1: nothing to clip
        line += " | 1 G step an epoch: ratio 1, no clip"
    elif "clipfrac" in s:
        line += f" | clipfrac {s['clipfrac']:.3f} approx_kl {s['approx_kl']:.1e}"
    if "kl" in s:  # beta_kl's term: the KL to the frozen base
        line += f" | kl to base {s['kl']:.1e}"
    eta = int(s.get("eta_s", 0))
    line += (f" | {s['seconds']:.1f}s {s['images_per_s']:.1f} img/s"
             f" | ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")
    return line + (f" | peak {s['peak_gib']:.1f} GiB" if "peak_gib" in s else "")
