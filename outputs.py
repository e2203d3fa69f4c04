"""
outputs.py — a run's folder: claiming it (one run per folder, a lock, --overwrite that removes only what a
run of ours wrote), and what the run keeps there besides its checkpoints — config.json, which --resume
starts from (`resume_config`: the saved config with the command line's keys on top; `resume_point`: the
newest intact checkpoint, the changed keys said and those that would make another experiment refused, a
finished run left alone), metrics.jsonl (a line per epoch; a line torn by a kill is dropped, not fatal)
and, when asked for, the same rows to wandb or tensorboard (neither is a dependency). A full disk is one
line naming the last intact checkpoint.

Leaves out: the checkpoints themselves (checkpoint.py), reading metrics.jsonl (eval.read_metrics), the
report drawn from it (eval.report).
"""
import dataclasses
import fcntl
import json
import os
import re
import typing

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
        return is_run_config(json.load(open(os.path.join(out, "config.json"))))
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

    def __init__(self, path, out_dir, written=None):
        self.path, self.out_dir, self.written = path, out_dir, written or {}
        self.file = guarded(path, out_dir, lambda: open(path, "a"))

    def write(self, row):
        guarded(self.path, self.out_dir, lambda: (self.file.write(json.dumps(row) + "\n"), self.file.flush()))


def open_metrics(out_dir, start, cfg=None):
    """metrics.jsonl (a Metrics); on resume, keep only the lines of epochs before `start`, in increasing
    epoch order (rewritten atomically), so redone epochs are not logged twice, and a torn, foreign or
    repeated line is gone. The held-out evaluation already written for epoch `start` (of the weights
    resumed from) is kept as .written {start: its eval/ values}, for eval.evaluate not to redo it — only
    when it was made with what `cfg` would evaluate with (eval.settings, logged beside it)."""
    path, written = os.path.join(out_dir, "metrics.jsonl"), {}
    now = E.settings(cfg) if cfg is not None else None
    if os.path.exists(path):
        keep = []
        for r in E.read_metrics(path):
            if isinstance(r.get("epoch"), int) and (keep[-1]["epoch"] if keep else -1) < r["epoch"] < start:
                keep.append(r)
            elif now is not None and r.get("epoch") == start and r.get("eval_settings") == now:
                written[start] = {k: v for k, v in r.items() if k.startswith(("eval/", "eval_settings"))}

        def rewrite():
            with open(path + ".tmp", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in keep)
            os.replace(path + ".tmp", path)
        guarded(path, out_dir, rewrite)
    return Metrics(path, out_dir, written)


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
# --resume

# Keys that define the experiment: changing one on --resume makes the resumed run another experiment
# (refused unless allow_config_change). Any other change is printed and applied.
SAME_EXPERIMENT = ("pretrained", "t5", "max_sequence_length", "resolution", "lora_rank", "lora_alpha",
                   "train_prompts", "num_steps", "sde_kind", "group_size", "prompts_per_epoch", "reward",
                   "references", "reference_root", "schedule", "d_conditional", "dino_backbone",
                   "dino_weights", "dino_kwargs", "dino_image_size", "pickscore_model",
                   "pickscore_train_last_k", "seed", "objective")
# Keys that change the shapes of the trained tensors: no checkpoint can continue under another value
SHAPES = ("lora_rank", "lora_targets", "d_hidden")

def config_changes(saved: dict, cfg, allow=False):
    """Lines describing each key that differs between a checkpoint's config and `cfg`. Refuses
    (SystemExit) a change of a SAME_EXPERIMENT key unless `allow`, of a SHAPES key always, and keys the
    current code does not know."""
    now = dataclasses.asdict(cfg)
    unknown = sorted(set(saved) - set(now))
    if unknown:
        raise SystemExit(f"--resume: the checkpoint's config has keys this version does not know: {unknown}")
    ignore = ("resume", "overwrite", "allow_config_change", "epochs")
    def same(k):  # a reward's weight may be written w or {"weight": w}: one reward
        canon = [{n: w if isinstance(w, dict) else {"weight": w} for n, w in v.items()}
                 if k == "reward" and isinstance(v, dict) else v for v in (saved[k], now[k])]
        return canon[0] == canon[1]
    changed = [k for k in now if k not in ignore and k in saved and not same(k)]
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
    rows = E.read_metrics(path, warn=lambda msg: None) if os.path.isfile(path) else []
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
    path, w = C.latest(cfg.out_dir, warn=say, weights=True)
    if path is None:
        raise SystemExit(f"--resume: no intact checkpoint in {cfg.out_dir}/checkpoints")
    changes = config_changes(json.load(open(os.path.join(path, "config.json"))), cfg, cfg.allow_config_change)
    if changes:
        say("\n".join([f"--resume: changed since {path}:", *changes]))
    done = int(C.NAME.match(os.path.basename(path)).group(1))
    if done > cfg.epochs or done == cfg.epochs and finished(cfg):
        say(f"--resume: {cfg.out_dir} is finished ({done} epochs done, epochs = {cfg.epochs}"
            f"{', final report written' if done == cfg.epochs else ''}): nothing to do; give "
            f"--epochs={done + 1} or more to train it further")
        raise SystemExit(0)
    return path, w


# --resume: the run's own config.json is where it starts; the --key=value arguments are the only changes
# (config_changes prints and checks them), and the presets on the command line only name the run folder.
# These keys are this command's, never the saved run's; those re-derived when the key they follow changes:
THIS_COMMAND = ("out_dir", "resume", "overwrite", "allow_config_change")
DERIVED = {"sde_kind": ("noise_level", "clip_range"), "pretrained": ("max_sequence_length",)}


def is_run_config(saved):
    """Whether a loaded config.json is a run's, as train.py writes it."""
    return isinstance(saved, dict) and {"out_dir", "save_every", "keep_last",
                                        "allow_config_change"} <= set(saved)


def resume_config(cfg, argv):
    """The config of `--resume`: out_dir/config.json (if it is gone, the newest checkpoint's) with the keys
    given as --key=value in `argv` on top; a key restated with its saved value changes nothing. `cfg` (as
    parsed) when the folder holds no readable config: train.py then says what is missing."""
    for path in [os.path.join(cfg.out_dir, "config.json"),
                 *(os.path.join(p, "config.json") for p in reversed(C.checkpoints(cfg.out_dir)))]:
        try:
            saved = json.load(open(path))
        except (OSError, ValueError):
            continue
        if is_run_config(saved):
            break
    else:
        return cfg
    hints = typing.get_type_hints(configurator.Config)
    given = {a[2:].partition("=")[0] for a in argv if a.startswith("--")}
    out = configurator.Config()
    for key, value in saved.items():
        if key in hints:  # keys this version does not know are refused by config_changes
            setattr(out, key, configurator._coerce(hints[key], key, value, path))
    for key in given.union(THIS_COMMAND):
        setattr(out, key, getattr(cfg, key))
    for key, derived in DERIVED.items():
        for d in derived:
            if key in given and d not in given and getattr(cfg, key) != saved.get(key):
                setattr(out, d, None)  # re-derived from the new value by resolve_defaults
    presets = {k for a in argv if a.endswith(".py") and not a.startswith("--")
               for k in configurator.run_preset(a)}
    aside = [f"{k}={getattr(cfg, k)!r}" for k in hints if k in presets and k not in given
             and k not in THIS_COMMAND and getattr(cfg, k) != getattr(out, k)]
    if aside and os.environ.get("RANK", "0") == "0":
        print(f"--resume: the run continues from {path}; its presets' {', '.join(aside)} are not applied "
              "(give --key=value to change a key)", flush=True)
    return configurator.resolve_defaults(out)


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


def peer_stopped(e):
    """What to raise for RuntimeError `e` on a surviving rank: gloo's "Connection closed / reset by peer"
    (another rank died mid-collective) as one line; anything else as it is."""
    if "by peer" not in str(e):
        return e
    return SystemExit(f"rank {os.environ.get('RANK', 0)}: another rank stopped during a collective "
                      f"({str(e).strip().splitlines()[-1][-80:]}); its own output says why")


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
