"""
sample.py — generate from a checkpoint and measure it; compare and summarise finished runs.

    python sample.py --ckpt out/tiny/checkpoints/epoch_000099                 # the run's test prompts
    python sample.py --ckpt CKPT --prompt "a red circle on the left" --n_per_prompt 8
    python sample.py --ckpt CKPT --prompts my_prompts.txt --num_steps 40 --guidance_scale 4.5
    python sample.py --pretrained stabilityai/stable-diffusion-3.5-medium --lora adv_grpo_dino/ \\
        --prompts p.txt
    python sample.py --compare out/demo/adversarial out/demo/frozen           # one before → after table
    python sample.py --summarize out/transfer_s0 out/transfer_s1 out/transfer_s2   # mean ± std over runs

--ckpt takes a checkpoint folder or a run folder (its newest intact checkpoint) and evaluates as the run
did by default (its eval steps, CFG, text length, held-out prompts; EMA weights, image i seeded by
(seed, i)), so its numbers match the run's metrics.jsonl. --pretrained with --lora evaluates a base model
plus a LoRA folder (PEFT's format, as the released Adv-GRPO / Flow-GRPO LoRAs, or diffusers'). It writes
PNGs, grid.png, metrics.json and reproduce.py (the same images in plain diffusers) to <run>/eval/epoch_N/
when it evaluates as the run did, to <run>/eval/epoch_N-<hash of its settings>/ otherwise (or --out); an
evaluation is never overwritten without --overwrite. PickScore / CLIP score are measured when those
weights can be loaded: models that are neither local nor cached are skipped in seconds when the hub does
not answer.

Leaves out: the metrics themselves (eval.py, shared with the training loop).
"""
import hashlib
import json
import math
import os
import re
import shutil
import socket
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from statistics import fmean, pstdev

import configurator  # stdlib only: --help answers before torch loads


@dataclass
class EvalArgs:
    ckpt: str = ""                    # a checkpoint folder (…/checkpoints/epoch_NNNNNN), or a run folder
                                      # (its newest)
    pretrained: str = ""              # instead of --ckpt: a base model (hub id, folder, random:<arch>),
                                      # evaluated with --lora (or alone: the base)
    lora: str = ""                    # with --pretrained: a LoRA folder, PEFT (adapter_config.json +
                                      # adapter_model.safetensors: the released Adv-GRPO / Flow-GRPO LoRAs)
                                      # or diffusers (pytorch_lora_weights.safetensors)
    resolution: int = 512             # with --pretrained: image side in pixels
    max_sequence_length: int | None = None  # with --pretrained: T5 tokens; None: the folder's
                                      # sample_settings.json, else 128
    t5: bool = True                   # with --pretrained: load T5-XXL (False: zeros in its place)
    mixed_precision: str = "bf16"     # with --pretrained: "bf16" or "no" (float32)
    prompts: str = ""                 # prompt file (.txt or .jsonl); default: the run's test_prompts
    prompt: list = field(default_factory=list)  # prompts given directly: --prompt "a cat" "a dog"
    n_per_prompt: int | None = None   # images per prompt; None: the run's eval_n_per_prompt
    num_steps: int | None = None      # ODE steps; None: the run's eval_num_steps
    guidance_scale: float | None = None  # CFG (≤ 1: none, as in diffusers); None: the run's
                                      # eval_guidance_scale
    seed: int = 0                     # image i is seeded by (seed, i): the run's in-loop evaluation used 0
    references: str = ""              # reference index or folder for dino_sim / fd_dino; default: the run's
                                      # (with --pretrained: none, those two not measured)
    dino_backbone: str = ""           # φ of dino_sim / fd_dino (timm name); default: the run's (with
                                      # --pretrained: DINOv2-B/14, the recipe's)
    dino_weights: str = ""            # a local weights file for dino_backbone (offline clusters)
    out: str = ""                     # output folder (default: <run>/eval/epoch_NNNNNN[-<settings hash>],
                                      # outside checkpoints/; with --pretrained: out/eval/<lora>-<hash>)
    overwrite: bool = False           # replace the evaluation already in that folder (its files only)
    summarize: list = field(default_factory=list)  # run folders: mean ± std of their summary.json
    compare: list = field(default_factory=list)  # run folders: one before → after table (make demo)


# -----------------------------------------------------------------------------------------------
# Finished runs side by side (--compare, --summarize): their summary.json and metrics.jsonl, no torch

def metric_rows(path):
    """The rows of a run's metrics.jsonl, as eval.read_metrics reads them (a torn or foreign line left
    out), without torch and without its warnings."""
    rows = []
    for raw in open(path, "rb").read().split(b"\n"):
        try:  # UnicodeDecodeError and json.JSONDecodeError are ValueErrors
            rows.append(json.loads(raw.decode("utf-8").strip().strip("\x00")))
        except ValueError:
            continue
    return [r for r in rows if isinstance(r, dict)]


def compare(run_dirs, keys=("toy_geneval", "fd_dino", "style_match", "train_reward")):
    """One table of several runs (e.g. the demo's adversarial and frozen-D runs): each key before → after,
    the best held-out toy GenEval / FD-DINO on the way (a reward that helped first and was hacked later
    shows here: its end is worse than its best), and the evaluations at which the reward-hacking monitor
    fired."""
    rows = []
    for d, s, name in [(d, read_summary(d, "--compare"), n) for d, n in zip(run_dirs, labels(run_dirs))]:
        log = os.path.join(d, "metrics.jsonl")  # (every summary checked first)
        rows.append((name, s, metric_rows(log) if os.path.isfile(log) else []))
    print(f"{'held-out (train_reward: training)':36s}" + "".join(f"{name:>24s}" for name, _, _ in rows))
    for k in keys:
        cells = [f"{s[k]['before']:.3f} → {s[k]['after']:.3f}" if k in s else "—" for _, s, _ in rows]
        print(f"{k:36s}" + "".join(f"{c:>24s}" for c in cells))
    for k, best in (("toy_geneval", max), ("fd_dino", min)):
        cells = []
        for _, _, log in rows:
            seen = [(r[f"eval/{k}"], r["epoch"]) for r in log if f"eval/{k}" in r]
            cells.append("—" if not seen else "{:.3f} (epoch {})".format(*best(seen, key=lambda v: v[0])))
        if any(c != "—" for c in cells):
            print(f"{k + ' best on the way':36s}" + "".join(f"{c:>24s}" for c in cells))
    flags = [[r["epoch"] for r in log if r.get("hacking_warning")] for _, _, log in rows]
    print(f"{'reward-hacking monitor':36s}" + "".join(
        f"{'FLAGGED at ' + ', '.join(map(str, f)) if f else 'quiet':>24s}" for f in flags))
    print(f"{'epochs':36s}" + "".join(f"{str(s['epochs']['before']) + ' → ' + str(s['epochs']['after']):>24s}"
                                      for _, s, _ in rows))


def labels(run_dirs):
    """Each run's column title: its folder's name, with as many parent folders as set it apart from the
    others (s0/adversarial and s1/adversarial)."""
    parts = [os.path.normpath(os.path.abspath(d)).split(os.sep) for d in run_dirs]
    for depth in range(1, max(map(len, parts)) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return names


def read_summary(run_dir, what):
    """A run's summary.json as {metric: {"before", "after"}} (and "epochs"), or one line naming the file."""
    path = os.path.join(run_dir, "summary.json")
    if not os.path.isfile(path):
        raise SystemExit(f"{what}: no summary.json in {run_dir} (a run writes it at its end, with "
                         "eval_every > 0)")
    try:
        with open(path, "rb") as f:
            s = json.loads(f.read().decode("utf-8"))
        if not isinstance(s, dict) or "epochs" not in s or not all(
                isinstance(v, dict) and {"before", "after"} <= set(v) for v in s.values()):
            raise ValueError("not {metric: {before, after}, epochs: {before, after}}")
        return s
    except ValueError as e:  # UnicodeDecodeError and json.JSONDecodeError are ValueErrors
        raise SystemExit(f"{what}: {path} is damaged ({str(e)[:100]}); rerun the run's end with --resume, "
                         "or leave that run out") from None


# Keys that may differ between runs averaged together (they do not change what a run computes)
SUMMARIZE_IGNORES = ("seed", "out_dir", "resume", "overwrite", "allow_config_change", "log_to", "save_every",
                     "keep_last", "compile")


def config_differences(run_dirs):
    """The config keys (other than SUMMARIZE_IGNORES) whose values differ between the runs' config.json."""
    configs = []
    for d in run_dirs:
        try:
            configs.append(json.load(open(os.path.join(d, "config.json"))))
        except (OSError, ValueError):
            continue  # no readable config: nothing to compare
    keys = sorted({k for c in configs for k in c} - set(SUMMARIZE_IGNORES))
    return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]


def summarize(run_dirs):
    """Mean ± std over runs (e.g. seeds) of each run's summary.json: {metric: (before, after)}; the std is
    the population's (ddof 0), said in the output. Warns when the runs are not the same
    experiment (their configs differ in more than the seed)."""
    rows = [read_summary(d, "--summarize") for d in run_dirs]
    if differ := config_differences(run_dirs):
        print(f"WARNING --summarize averages runs whose configs differ in {', '.join(differ)}")
    out = {}
    for k in rows[0]:
        if k == "epochs" or not all(k in r for r in rows):
            continue
        b, a = [r[k]["before"] for r in rows], [r[k]["after"] for r in rows]
        out[k] = dict(before=fmean(b), before_std=pstdev(b), after=fmean(a), after_std=pstdev(a))
        print(f"{k:16s} {fmean(b):.3f} ± {pstdev(b):.3f}  →  {fmean(a):.3f} ± {pstdev(a):.3f}  "
              f"(n={len(rows)}, ± population std)")
    return out



if __name__ == "__main__" and any(a in ("-h", "--help") or a.startswith(("--compare", "--summarize"))
                                 for a in sys.argv[1:]):  # answered before torch loads (~7 s)
    (_args,) = configurator.parse(sys.argv[1:], EvalArgs, usage=__doc__.split("\n\n")[1] + "\n")
    if _args.summarize or _args.compare:
        summarize(_args.summarize) if _args.summarize else compare(_args.compare)
        raise SystemExit(0)

import torch
from huggingface_hub import try_to_load_from_cache
from PIL import Image

import archs
import checkpoint as C
import data
import eval as E
import model as M
import outputs as O
import reward as R

ROOT = os.path.dirname(os.path.abspath(__file__))

def measure_preference(images, prompts, device, cfg, online=True):
    """PickScore and CLIP score from the models the run's config names, when their weights can be loaded
    (local folder, cache, or the hub when `online`). (metrics, skipped)."""
    m, skipped = {}, {}
    models = dict(pickscore_model=cfg.pickscore_model, pickscore_processor=cfg.pickscore_processor,
                  clip_model=cfg.clip_model)
    for name, model in (("pickscore", cfg.pickscore_model), ("clip_score", cfg.clip_model)):
        why = available(model, online)
        if why is not None:
            skipped[name] = f"{model}: {why}"
            continue
        try:
            fn = R.build_reward({name: 1.0}, device=device, **models)
        except Exception as e:  # offline, no cache, gated model...
            skipped[name] = f"model not available ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
            continue
        m[name] = float(fn(images.to(device), prompts, [{}] * len(prompts))[0].mean())
    return m, skipped



def hub_reachable(timeout=3.0):
    """Whether huggingface.co answers within `timeout` s (False at once under HF_HUB_OFFLINE=1): without it,
    a model that is not cached is skipped in seconds instead of after the hub client's retries."""
    if archs.hub_offline():
        return False

    def connect():  # name resolution has no timeout of its own: the whole attempt runs in a thread
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
    pool = ThreadPoolExecutor(1)
    try:
        pool.submit(connect).result(timeout=timeout)
        return True
    except Exception:
        return False
    finally:
        pool.shutdown(wait=False)


def available(name, online):
    """None if model `name` (a folder, "random:…", or a hub id) can be loaded now, else why not."""
    if os.path.isdir(name) or name.startswith("random:") or online:
        return None
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return None
    return "not in the local cache and the hub is unreachable (or HF_HUB_OFFLINE=1)"


def load_checkpoint_config(path):
    """(checkpoint folder, its Config) for --ckpt, refusing what it cannot evaluate in one line."""
    if not os.path.isdir(path):
        raise SystemExit(f"--ckpt {path}: no such folder")
    if os.path.isdir(os.path.join(path, "checkpoints")):  # a run folder: its newest intact checkpoint
        newest = C.latest(path)
        if newest is None:
            raise SystemExit(f"--ckpt {path} is a run folder without an intact checkpoint")
        print(f"--ckpt {path} is a run folder: evaluating its newest intact checkpoint {newest}")
        path = newest
    why = C.verify(path)
    if why is not None and (os.path.exists(os.path.join(path, C.MANIFEST)) or
                            not os.path.isfile(os.path.join(path, "config.json"))):
        raise SystemExit(f"--ckpt {path} is not an intact checkpoint: {why}")
    if why is not None:
        print(f"WARNING {path}: {why}; evaluating it anyway")
    try:
        return path, configurator.Config(**json.load(open(os.path.join(path, "config.json"))))
    except (TypeError, ValueError) as e:
        raise SystemExit(f"{path}/config.json does not describe a run of this version: {e}") from None


def pretrained_config(args):
    """The Config of a base model plus a LoRA folder (--pretrained, --lora), from the LoRA's own rank,
    alpha and target modules; refused in one line before any weights load when it cannot be evaluated."""
    rank, alpha, targets = configurator.Config.lora_rank, configurator.Config.lora_alpha, None  # inert
    if args.lora:  # what the adapter adapts, at its rank and alpha
        rank, alpha, targets = M.lora_settings(args.lora, "--lora")
    cfg = configurator.Config(pretrained=args.pretrained, t5=args.t5, resolution=args.resolution,
                              max_sequence_length=args.max_sequence_length,
                              mixed_precision=args.mixed_precision, lora_rank=rank, lora_alpha=alpha,
                              lora_targets=sorted(targets or []), init_lora=args.lora, eval_max_prompts=0,
                              references="")  # none unless --references: never data/refs/ by chance
    configurator.resolve_defaults(cfg)
    if bad := configurator.check(cfg):
        raise SystemExit(f"--pretrained: {bad}")
    return cfg


def evaluation_settings(args, cfg):
    """What an evaluation is: its prompts, images per prompt, steps, CFG and seed (the given ones, else the
    run's). Refuses values that cannot sample in one line."""
    steps = cfg.eval_num_steps if args.num_steps is None else args.num_steps
    scale = cfg.eval_guidance_scale if args.guidance_scale is None else args.guidance_scale
    n = cfg.eval_n_per_prompt if args.n_per_prompt is None else args.n_per_prompt
    for key, value, low in (("n_per_prompt", n, 1), ("num_steps", steps, 1), ("guidance_scale", scale, 0)):
        if not (math.isfinite(value) and value >= low):
            raise SystemExit(f"--{key} must be ≥ {low}, got {value}")
    try:
        base = args.prompt or [p["prompt"] for p in data.load_prompts(args.prompts or cfg.test_prompts)]
    except ValueError as e:
        raise SystemExit(f"prompts: {e}") from None
    if not (args.prompt or args.prompts):
        base = base[:cfg.eval_max_prompts or None]
    return dict(prompts=base, n_per_prompt=n, num_steps=steps, guidance_scale=scale, seed=args.seed)


OUR_FILES = re.compile(O.EVAL_FILES)  # an evaluation's files (train.py --overwrite of its run removes them)


def output_folder(args, ckpt, cfg, settings):
    """Where this evaluation goes, checked writable now (a bad --out fails before any image is made). A
    checkpoint's evaluation with the run's own settings is <run>/eval/epoch_N; any other gets the hash of
    what it evaluated appended (epoch_N-1a2b3c4d), so evaluations never overwrite each other. A folder
    that already holds an evaluation is refused without --overwrite; with it, that evaluation's files are
    removed before the new ones are written (no stale image survives), and nothing else."""
    out = args.out
    if not out:
        what = dict(settings, pretrained=cfg.pretrained, lora=os.path.abspath(args.lora) if args.lora else "",
                    resolution=cfg.resolution, max_sequence_length=cfg.max_sequence_length, t5=cfg.t5,
                    **{k: getattr(args, k) for k in ("references", "dino_backbone", "dino_weights")
                       if getattr(args, k)})
        tag = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:8]
        if ckpt:
            own = settings == evaluation_settings(EvalArgs(), cfg) and not (
                args.references or args.dino_backbone or args.dino_weights)
            out = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(ckpt))), "eval",
                               os.path.basename(ckpt) + ("" if own else f"-{tag}"))
        else:
            name = short(args.lora or args.pretrained).replace(":", "_")
            out = os.path.join("out", "eval", f"{name}-{tag}")
    try:
        os.makedirs(out, exist_ok=True)
        ours = sorted(n for n in os.listdir(out) if OUR_FILES.match(n))
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise SystemExit(f"--out {out} cannot be written: {e.strerror or e}") from None
    if ours and not args.overwrite:
        raise SystemExit(f"--out {out} already holds an evaluation ({', '.join(ours[:3])}"
                         f"{' …' if len(ours) > 3 else ''}): --overwrite to replace it, or another --out")
    return out


REPRODUCE = '''"""These images re-made with plain diffusers (written by sample.py); what: reproduce.json.

    python reproduce.py [folder]     # 0000.png ... into folder (default: reproduced/ beside this file)

Image i starts from the noise of torch.Generator().manual_seed(seed * 1_000_003 + i), the rule of
sample.py's evaluation images. The LoRA is the copy in lora/ beside this file: the folder can be moved, and
the run's checkpoints pruned.{note}"""
import json
import os
import sys

import torch
from diffusers import StableDiffusion3Pipeline

here = os.path.dirname(os.path.abspath(__file__))
S = json.load(open(os.path.join(here, "reproduce.json")))
DTYPE, LORA = getattr(torch, S["dtype"]), os.path.join(here, "lora")
out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "reproduced")
{load}
pipe.set_progress_bar_config(disable=True)
pipe.to("cuda" if torch.cuda.is_available() else "cpu")
os.makedirs(out, exist_ok=True)
for i, prompt in enumerate(p for p in S["prompts"] for _ in range(S["n_per_prompt"])):
    image = pipe(prompt, generator=torch.Generator().manual_seed(S["seed"] * 1_000_003 + i),
                 num_inference_steps=S["num_steps"], guidance_scale=S["guidance_scale"],
                 max_sequence_length=S["max_sequence_length"], height=S["resolution"],
                 width=S["resolution"]).images[0]
    image.save(os.path.join(out, f"{{i:04d}}.png"))
print(f"wrote {{i + 1}} images to {{out}}")
'''


def short(path):
    """The last name of a path (a run, a checkpoint, a LoRA folder): how titles name them."""
    return os.path.basename(os.path.abspath(path))  # a hub id: its model name


def write_reproduce(out, cfg, lora, settings, what):
    """reproduce.py beside an evaluation, its settings in reproduce.json (data, never pasted into code: any
    folder name is safe) and a copy of the LoRA in lora/: the diffusers calls (base, LoRA, steps, CFG, text
    length, resolution, per-image seeds) that re-make its images, wherever the folder goes."""
    base = os.path.abspath(cfg.pretrained) if os.path.isdir(cfg.pretrained) else cfg.pretrained
    if base.startswith("random:"):
        load = ("sys.path.insert(0, S[\"repository\"])  # random weights: built by this repository\n"
                "import model  # noqa: E402\n"
                "pipe = model.random_pipeline(S[\"base\"].split(\":\", 1)[1], t5=S[\"t5\"], dtype=DTYPE)")
    else:
        load = ("pipe = StableDiffusion3Pipeline.from_pretrained(\n"
                "    S[\"base\"], dtype=DTYPE,\n"
                "    **({} if S[\"t5\"] else dict(text_encoder_3=None, tokenizer_3=None)))")
    if lora and os.path.isfile(os.path.join(lora, "adapter_config.json")):  # PEFT, loaded as its authors do
        load += ("\nfrom peft import PeftModel  # noqa: E402\n"
                 "pipe.transformer = PeftModel.from_pretrained(pipe.transformer, LORA)")
    elif lora:  # diffusers' format (our checkpoints' lora/: the EMA weights the evaluation used)
        load += "\npipe.load_lora_weights(LORA, weight_name=\"pytorch_lora_weights.safetensors\")"
    note = ("" if cfg.mixed_precision == "no" else "\nThe evaluation ran in bf16 (frozen weights bf16, LoRA "
            "float32, autocast): the images agree to bf16 rounding.")
    if lora:
        shutil.copytree(lora, os.path.join(out, "lora"))
    json.dump(dict(what=what, base=base, lora=os.path.abspath(lora) if lora else None, repository=ROOT,
                   max_sequence_length=cfg.max_sequence_length, resolution=cfg.resolution, t5=cfg.t5,
                   dtype="bfloat16" if cfg.mixed_precision == "bf16" else "float32", **settings),
              open(os.path.join(out, "reproduce.json"), "w"), indent=1)
    with open(os.path.join(out, "reproduce.py"), "w") as f:
        f.write(REPRODUCE.format(note=note, load=load))


def main(argv=None):
    (args,) = configurator.parse(sys.argv[1:] if argv is None else argv, EvalArgs,
                                 usage=__doc__.split("\n\n")[1] + "\n")
    if args.summarize:
        return summarize(args.summarize)
    if args.compare:
        return compare(args.compare)
    if bool(args.ckpt) == bool(args.pretrained) or (args.lora and not args.pretrained):
        raise SystemExit("give --ckpt (a checkpoint or run folder), or --pretrained (with --lora DIR), "
                         "or --summarize / --compare")
    if args.ckpt:
        ckpt, cfg = load_checkpoint_config(args.ckpt)
        lora = os.path.join(ckpt, "lora") if cfg.lora_rank > 0 else ""
    else:
        ckpt, cfg, lora = "", pretrained_config(args), args.lora
    for key in ("references", "dino_backbone", "dino_weights"):  # what the DINO metrics depend on
        if getattr(args, key):
            setattr(cfg, key, getattr(args, key))
    missing = archs.missing_weights(cfg)
    if missing:  # before anything loads or any folder is made
        raise SystemExit("\n".join(missing))
    settings = evaluation_settings(args, cfg)
    base, n, steps, scale = (settings[k] for k in ("prompts", "n_per_prompt", "num_steps", "guidance_scale"))
    made = not os.path.isdir(args.out) if args.out else None
    out = output_folder(args, ckpt, cfg, settings)
    try:
        evaluate(args, ckpt, cfg, lora, settings, out)
    except BaseException:  # a failed call leaves no empty folder of ours behind
        if (made or made is None) and os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)
        raise


def evaluate(args, ckpt, cfg, lora, settings, out):
    """Generate, measure and write one evaluation into `out` (main's checks done)."""
    base, n, steps, scale = (settings[k] for k in ("prompts", "n_per_prompt", "num_steps", "guidance_scale"))
    if scale < 1:
        print(f"guidance_scale {scale} < 1: no classifier-free guidance (the images of 1), as in diffusers")
    M.quiet_libraries()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = M.build_generator(cfg, device)
    if ckpt:
        try:
            loaded = C.load_weights(gen, ckpt)  # another one if a live run pruned it meanwhile
        except (KeyError, RuntimeError) as e:
            raise SystemExit(f"{ckpt}: its weights do not fit the model its config.json describes "
                             f"({type(e).__name__}: {str(e)[:160]})") from None
        if loaded != ckpt:  # filed, labelled and reproduced as the checkpoint it is
            lora = os.path.join(loaded, "lora") if lora else ""
            if not args.out and os.path.isdir(out) and not os.listdir(out):
                os.rmdir(out)
                out = output_folder(args, loaded, cfg, settings)
            ckpt = loaded
    prompts = [p for p in base for _ in range(n)]
    images = E.generate(gen, prompts, args.seed, steps, scale)
    refs = None
    try:
        refs = data.load_references(cfg, [{"prompt": p} for p in base]) if cfg.references else None
    except (SystemExit, ValueError) as e:
        print(f"references not used: {e}")
    online = hub_reachable()
    features, skipped = None, {}
    why = available(cfg.dino_backbone, online) if not cfg.dino_weights else None
    if why is None:
        features = R.make_features(cfg, device)
    else:
        skipped["dino_sim"] = skipped["fd_dino"] = f"{cfg.dino_backbone}: {why}"
    metrics, more = E.measure(images, prompts, refs, features)
    skipped = {**more, **skipped}
    pm, ps = measure_preference(images, prompts, device, cfg, online)
    metrics.update(pm)
    skipped.update(ps)
    what = (f"{short(os.path.dirname(os.path.dirname(ckpt)))}/{short(ckpt)} (EMA weights)" if ckpt
            else short(cfg.pretrained) + (f" + {short(lora)}" if lora else "")) + \
        f", {len(base)} prompts × {n}, {steps} steps, CFG {scale}, seed {args.seed}"
    stage = tempfile.mkdtemp(prefix=".new-", dir=out)  # written whole first: a failure keeps the earlier one
    try:
        for i, im in enumerate(images):
            Image.fromarray((im.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()).save(
                os.path.join(stage, f"{i:04d}.png"))
        E.save_grid(images, os.path.join(stage, "grid.png"), nrow=n, labels=prompts, title=what)
        json.dump(dict(metrics=metrics, skipped=skipped, prompts=prompts, n_per_prompt=n, num_steps=steps,
                       guidance_scale=scale, seed=args.seed, checkpoint=ckpt, pretrained=cfg.pretrained,
                       lora=lora), open(os.path.join(stage, "metrics.json"), "w"), indent=1)
        if not ckpt or os.path.isfile(os.path.join(lora, "pytorch_lora_weights.safetensors")):  # no: full FT
            write_reproduce(stage, cfg, lora, settings, what)
        for name in os.listdir(out):  # --overwrite: the earlier evaluation's files go, none is left stale
            if OUR_FILES.match(name):
                (shutil.rmtree if name == "lora" else os.remove)(os.path.join(out, name))
        for name in os.listdir(stage):
            os.replace(os.path.join(stage, name), os.path.join(out, name))
    except OSError as e:
        if not C.disk_full(e):
            raise
        raise SystemExit(f"disk full while writing the evaluation into {out}; an earlier one there is "
                         "kept") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    print(json.dumps(metrics, indent=1))
    if "fd_dino" in metrics and len(images) < 50:
        print(f"WARNING fd_dino from {len(images)} images is unreliable: its covariances need ~50 or more")
    for k, why in skipped.items():
        print(f"skipped {k}: {why}")
    print(f"wrote {out}" + ("; reproduce.py there makes the same images in plain diffusers"
                            if os.path.isfile(os.path.join(out, "reproduce.py")) else ""))


if __name__ == "__main__":
    main()
