"""
sample.py — generate from a checkpoint and measure it; compare and summarise finished runs.

    python sample.py --ckpt out/tiny/checkpoints/epoch_000099                 # the run's test prompts
    python sample.py --ckpt CKPT --prompt "a red circle on the left" --n_per_prompt 8
    python sample.py --ckpt CKPT --prompts my_prompts.txt --num_steps 40 --guidance_scale 4.5
    python sample.py --compare out/demo/adversarial out/demo/frozen           # one before → after table
    python sample.py --summarize out/transfer_s0 out/transfer_s1 out/transfer_s2   # mean ± std over runs

--ckpt takes a checkpoint folder or a run folder (its newest intact checkpoint) and evaluates as the run
did by default (its eval steps, CFG, text length, held-out prompts; EMA weights, image i seeded by
(seed, i)), so its numbers match the run's metrics.jsonl. It writes PNGs, grid.png and metrics.json to
<run>/eval/epoch_N/ (or --out), with PickScore / CLIP score when those weights can be loaded: models that
are neither local nor cached are skipped in seconds when the hub does not answer.

Leaves out: the metrics themselves (eval.py, shared with the training loop).
"""
import json
import os
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from huggingface_hub import try_to_load_from_cache
from PIL import Image

import checkpoint as C
import configurator
import data
import eval as E
import model as M
import reward as R

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



def compare(run_dirs, keys=("toy_geneval", "fd_dino", "style_match", "train_reward")):
    """One table of several runs (e.g. the demo's adversarial and frozen-D runs): each key before → after,
    and whether the reward-hacking monitor fired during the run."""
    rows = []
    for d in run_dirs:
        if not os.path.isfile(os.path.join(d, "summary.json")):
            raise SystemExit(f"--compare: no summary.json in {d}")
        s = json.load(open(os.path.join(d, "summary.json")))
        flagged = any(r.get("hacking_warning") for r in C.read_metrics(os.path.join(d, "metrics.jsonl")))
        rows.append((os.path.basename(os.path.normpath(d)), s, flagged))
    print(f"{'held-out (train_reward: training)':36s}" + "".join(f"{name:>24s}" for name, _, _ in rows))
    for k in keys:
        cells = [f"{s[k]['before']:.3f} → {s[k]['after']:.3f}" if k in s else "—" for _, s, _ in rows]
        print(f"{k:36s}" + "".join(f"{c:>24s}" for c in cells))
    print(f"{'reward-hacking monitor':36s}" + "".join(f"{'FLAGGED' if f else 'quiet':>24s}"
                                                      for _, _, f in rows))
    print(f"{'epochs':36s}" + "".join(f"{str(s['epochs']['before']) + ' → ' + str(s['epochs']['after']):>24s}"
                                      for _, s, _ in rows))



def summarize(run_dirs):
    """Mean ± std over runs (e.g. seeds) of each run's summary.json: {metric: (before, after)}."""
    missing = [d for d in run_dirs if not os.path.isfile(os.path.join(d, "summary.json"))]
    if missing:
        raise SystemExit(f"--summarize: no summary.json in {', '.join(missing)} (a run writes it at its end, "
                         "with eval_every > 0)")
    rows = [json.load(open(os.path.join(d, "summary.json"))) for d in run_dirs]
    out = {}
    for k in rows[0]:
        if k == "epochs":
            continue
        b, a = np.array([r[k]["before"] for r in rows]), np.array([r[k]["after"] for r in rows])
        out[k] = dict(before=float(b.mean()), before_std=float(b.std()), after=float(a.mean()),
                      after_std=float(a.std()))
        print(f"{k:16s} {b.mean():.3f} ± {b.std():.3f}  →  {a.mean():.3f} ± {a.std():.3f}   (n={len(rows)})")
    return out



@dataclass
class EvalArgs:
    ckpt: str = ""                    # a checkpoint folder (…/checkpoints/epoch_NNNNNN), or a run folder
                                      # (its newest)
    prompts: str = ""                 # prompt file (.txt or .jsonl); default: the run's test_prompts
    prompt: list = field(default_factory=list)  # prompts given directly: --prompt "a cat" "a dog"
    n_per_prompt: int | None = None   # images per prompt; None: the run's eval_n_per_prompt
    num_steps: int | None = None      # ODE steps; None: the run's eval_num_steps
    guidance_scale: float | None = None  # CFG; None: the run's eval_guidance_scale
    seed: int = 0                     # image i is seeded by (seed, i): the run's in-loop evaluation used 0
    out: str = ""                     # output folder (default: <run>/eval/epoch_NNNNNN, outside checkpoints/)
    summarize: list = field(default_factory=list)  # run folders: mean ± std of their summary.json
    compare: list = field(default_factory=list)  # run folders: one before → after table (make demo)


def hub_reachable(timeout=3.0):
    """Whether huggingface.co answers within `timeout` s (False at once under HF_HUB_OFFLINE=1): without it,
    a model that is not cached is skipped in seconds instead of after the hub client's retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
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


def main(argv=None):
    (args,) = configurator.parse(sys.argv[1:] if argv is None else argv, EvalArgs,
                                 usage=__doc__.split("\n\n")[1] + "\n")
    if args.summarize:
        return summarize(args.summarize)
    if args.compare:
        return compare(args.compare)
    if not args.ckpt:
        raise SystemExit("--ckpt is required (or --summarize)")
    ckpt, cfg = load_checkpoint_config(args.ckpt)
    M.quiet_libraries()
    steps = args.num_steps or cfg.eval_num_steps       # by default, as the run evaluated itself
    scale = args.guidance_scale or cfg.eval_guidance_scale
    n = cfg.eval_n_per_prompt if args.n_per_prompt is None else args.n_per_prompt
    if n < 1 or steps < 1 or scale < 1:
        raise SystemExit("--n_per_prompt and --num_steps must be ≥ 1 and --guidance_scale ≥ 1")
    try:
        base = args.prompt or [p["prompt"] for p in data.load_prompts(args.prompts or cfg.test_prompts)]
    except ValueError as e:
        raise SystemExit(f"prompts: {e}") from None
    if not (args.prompt or args.prompts):
        base = base[:cfg.eval_max_prompts or None]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = M.build_generator(cfg, device)
    try:
        ckpt = C.load_weights(gen, ckpt)  # another one if a live run pruned it meanwhile
    except (KeyError, RuntimeError) as e:
        raise SystemExit(f"{ckpt}: its weights do not fit the model its config.json describes "
                         f"({type(e).__name__}: {str(e)[:160]})") from None
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
    out = args.out or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(ckpt))), "eval",
                                   os.path.basename(ckpt))
    os.makedirs(out, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray((im.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()).save(
            os.path.join(out, f"{i:04d}.png"))
    E.save_grid(images, os.path.join(out, "grid.png"), nrow=n, labels=prompts)
    json.dump(dict(metrics=metrics, skipped=skipped, prompts=prompts, num_steps=steps, guidance_scale=scale,
                   seed=args.seed, checkpoint=ckpt), open(os.path.join(out, "metrics.json"), "w"), indent=1)
    print(json.dumps(metrics, indent=1))
    if "fd_dino" in metrics and len(images) < 50:
        print(f"WARNING fd_dino from {len(images)} images is unreliable: its covariances need ~50 or more")
    for k, why in skipped.items():
        print(f"skipped {k}: {why}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
