"""
eval.py — held-out evaluation in the training loop: generate with the EMA weights, measure, draw.

train.py calls `evaluate` every `eval_every` epochs on the fixed held-out prompts, with fixed seeds, so
curves compare like with like, `hacking_warning` (through its monitor) at each evaluation, `watch_health`
every epoch (the discriminator's health), and `report` at the end (curves.png, summary.json). sample.py,
the command line, evaluates a checkpoint with the same functions.

Metrics (each is skipped, with the reason recorded, when its ingredients are missing):
- dino_sim: mean cosine of DINO CLS features between a generation and *its own prompt's* references
  (the published evaluation takes the max over all prompts' references: a generation can then score
  well by resembling some other prompt's picture).
- fd_dino: Fréchet distance between generations and references in DINO CLS space (FD-DINOv2).
- toy_geneval: the share of generations whose colour, shape, position and count (toy_colour, toy_shape,
  toy_position, toy_count: each attribute alone) all match the prompt; background: the mean brightness of
  the images' one-pixel border in [0, 1] (ref_background: the references'); saturation: the mean HSV
  saturation of the drawn objects' cores; style_match: the share of generations whose background is
  within 0.25 of ref_background; toy_geneval_matched: toy_geneval among those. Exact pixel metrics for
  prompts of the shapes world (tinyworld.py), held out: no training reward sees them.
- ocr: the OCR reward's score (scorers.py) averaged over the images, when every prompt quotes a text
  ("a sign that reads \"Open\""): the text-rendering accuracy of the paper's OCR experiment.
- pickscore / clip_score (sample.py only): when those models can be loaded (the hub or a local copy).

Leaves out: loading checkpoints and the command line (sample.py), training rewards (reward.py).

Departs from the published code: the paired dino_sim above; FD computed in float64 with an
eigen-decomposition (no scipy).
"""

import contextlib
import json
import math
import os

import matplotlib
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import reward as R
import sampler as S
import scorers
import tinyworld as tw

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402 (after the backend is chosen)


@torch.no_grad()
def generate(gen, prompts, seed=0, num_steps=40, guidance_scale=4.5, batch_size=32, use_ema=True):
    """ODE samples of the model.Generator `gen` for `prompts` (one image each; repeat a prompt for more),
    image i seeded by (seed, i)."""
    sigmas = S.flow_sigmas(gen.pipe.scheduler, num_steps, gen.device)
    shape, out = gen.latent_shape(), []
    with gen.ema.applied(gen.params) if use_ema else contextlib.nullcontext():
        for b in range(0, len(prompts), batch_size):
            p = prompts[b:b + batch_size]
            noise = torch.stack([
                torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + b + i))
                for i in range(len(p))]).to(gen.device)
            vel = S.make_velocity_fn(gen.sample_model, *gen.encode(p), *gen.encode([""]), guidance_scale,
                                     gen.autocast)
            r = S.rollout(vel, noise, sigmas, window_size=0, decode_fn=gen.decode)
            out.append(r["images"].float().cpu())
    return torch.cat(out)                                                  # (B, 3, H, W) in [0, 1]


def frechet_distance(a, b):
    """Fréchet distance between Gaussians fitted to feature sets a (N, D) and b (M, D), in float64."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    w, v = torch.linalg.eigh(ca)
    sqrt_a = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T                  # ca^½
    tr_sqrt = torch.linalg.eigvalsh(sqrt_a @ cb @ sqrt_a).clamp(min=0).sqrt().sum()   # tr (ca^½ cb ca^½)^½
    return float(((mu_a - mu_b) ** 2).sum() + ca.trace() + cb.trace() - 2 * tr_sqrt)


def measure(images, prompts, references=None, features=None):
    """All metrics that apply. `features(images) -> (cls, patches)` is a frozen DINO-style backbone;
    `references` a data.ReferenceSet. Returns (metrics dict, skipped {name: reason})."""
    m, skipped = {}, {}
    if features is not None and references is not None:
        gen = features(images)[0].float().cpu()  # (B, D) CLS of the generations
        ref_feats = {}
        for p in dict.fromkeys(prompts):
            try:
                ref_feats[p] = features(references.images_of(p))[0].float().cpu()
            except KeyError:
                ref_feats[p] = None  # a held-out prompt without references: not scored
        scored = [i for i, p in enumerate(prompts) if ref_feats[p] is not None]
        refs = torch.cat([f for f in ref_feats.values() if f is not None]) if scored else None
        bad = int((~torch.isfinite(gen).all(1)).sum())
        if not scored:
            skipped["dino_sim"] = skipped["fd_dino"] = "no references for these prompts"
        elif bad or not torch.isfinite(refs).all():  # a diverged model: say so rather than crash the run
            skipped["dino_sim"] = skipped["fd_dino"] = (
                f"non-finite DINO features in {bad} of {len(gen)} generations"
                + ("" if torch.isfinite(refs).all() else " and in the references"))
        else:
            m["dino_sim"] = float(R.paired_cosine(gen[scored], [prompts[i] for i in scored],
                                                  ref_feats).mean())
            if len(refs) > 1 and len(images) > 1:
                try:
                    m["fd_dino"] = frechet_distance(gen, refs)
                except torch.linalg.LinAlgError as e:
                    skipped["fd_dino"] = f"covariance eigendecomposition failed ({str(e)[:80]})"
            else:
                skipped["fd_dino"] = "needs at least 2 generations and 2 references"
    else:
        skipped["dino_sim"] = skipped["fd_dino"] = "no references or no feature backbone in this run"
    if prompts and all(scorers.quoted(p) for p in prompts):
        m["ocr"] = float(scorers.ocr_scores(scorers.ocr_engine(), images, prompts)[0].mean())
    try:
        list(map(tw.parse, prompts))  # ValueError outside the shapes-world grammar
    except ValueError:
        skipped["toy_geneval"] = "prompts are not in the shapes-world grammar"
    else:
        acc = tw.accuracy(images, prompts)
        m["toy_geneval"] = acc["correct"]
        m.update({f"toy_{k}": v for k, v in acc.items() if k != "correct"})
        st = tw.style_stats(images)
        m["background"] = float(st["background_brightness"].mean())
        m["saturation"] = float(st["saturation"].mean())
        if references is not None:
            try:
                rst = tw.style_stats(torch.cat([references.images_of(p) for p in dict.fromkeys(prompts)]))
                m["ref_background"] = float(rst["background_brightness"].mean())
                # style match: share of generations whose background is within 0.25 of the references'
                match = (st["background_brightness"] - m["ref_background"]).abs() < 0.25
                m["style_match"] = float(match.float().mean())
                # content among the generations already in the references' style: separates "content
                # lost" from "the base is weaker in that style" (the tiny base draws dark less well)
                if match.any():
                    ok = [tw.analyse(images[i], prompts[i])["correct"]
                          for i in match.nonzero().flatten().tolist()]
                    m["toy_geneval_matched"] = float(np.mean(ok))
            except KeyError:
                pass
    return m, skipped


CAPTION = 30  # px above each prompt's images in a labelled grid: two lines of its prompt


def grid_layout(prompts, n, h):
    """A grid's geometry (scale, columns, block width, block height): blocks of a caption over n images of
    h px, side by side so that the grid is about 4:3."""
    scale = max(1, 64 // h)
    bw, bh = n * (h + 2) * scale + 8, (h + 2) * scale + CAPTION
    return scale, max(1, min(prompts, math.ceil(math.sqrt(prompts * bh * 4 / (3 * bw))))), bw, bh


def save_grid(images, path, nrow=8, labels=None, title=""):
    """A PNG grid of images (B, 3, H, W) in [0, 1] under `title`: every nrow images are a block captioned
    with their `labels` (one per image, e.g. its prompt), scaled up so 32-px toys are visible, the blocks
    laid out by grid_layout."""
    x = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()   # (B, H, W, 3)
    b, h, w, _ = x.shape
    blocks, font, top = (b + nrow - 1) // nrow, ImageFont.load_default(size=12), 20 if title else 0
    scale, cols, bw, bh = grid_layout(blocks, nrow, h)
    canvas = Image.new("RGB", (max(cols * bw, int(font.getlength(title)) + 8),
                               top + (blocks + cols - 1) // cols * bh), "white")
    (draw := ImageDraw.Draw(canvas)).text((4, 3), title, fill="black", font=font)
    for k in range(blocks):  # block k: its caption (wrapped to the block's width, two lines), its images
        x0, y0, lines = k % cols * bw + 4, top + k // cols * bh, [""]
        for word in " / ".join(dict.fromkeys((labels or [""] * b)[k * nrow:(k + 1) * nrow])).split():
            if lines[-1] and font.getlength(f"{lines[-1]} {word}") > bw - 8:
                lines.append("")
            lines[-1] = f"{lines[-1]} {word}".strip()
        draw.text((x0, y0 + 2), "\n".join(lines[:2]), fill="black", font=font, spacing=2)
        for j, tile in enumerate(x[k * nrow:(k + 1) * nrow]):
            canvas.paste(Image.fromarray(tile).resize((w * scale, h * scale), Image.NEAREST),
                         (x0 + j * (w + 2) * scale, y0 + CAPTION))
    canvas.save(path)


def plot_curves(metrics_path, out_path, run="", train_key="reward_mean",
                eval_keys=("eval/toy_geneval", "eval/style_match", "eval/background", "eval/dino_sim")):
    """Training reward and held-out metrics against epoch: the reward-hacking picture; FD-DINO to the
    references (a distance, not a share) in its own panel below, the legend to the right of the data; with
    an adversary, its health at the bottom: D accuracy, d_signal and ref_sim per epoch, warnings marked."""
    rows = read_metrics(metrics_path)
    health = any("d_signal" in r or "d_acc" in r for r in rows)
    fig, (ax, fd, *hl) = plt.subplots(2 + health, 1, figsize=(9, 5.5 + 2 * health), sharex=True,
                                      height_ratios=(2, 1, 1)[:2 + health], layout="constrained")
    ax.plot(*zip(*[(r["epoch"], r[train_key]) for r in rows if train_key in r]), color="k", lw=1,
            label=f"train {train_key} (left)")
    ax.set_ylabel("training reward")
    ax2 = ax.twinx()
    for k in eval_keys:
        if pts := [(r["epoch"], r[k]) for r in rows if k in r]:
            ax2.plot(*zip(*pts), marker="o", label=f"held-out {k[5:]} (right)")
    ax2.set_ylabel("held-out metric")
    if pts := [(r["epoch"], r["eval/fd_dino"]) for r in rows if "eval/fd_dino" in r]:
        fd.plot(*zip(*pts), marker="o", color="C5", label="held-out fd_dino (below)")
    fd.set(ylabel="FD-DINO to refs ↓")
    for h in hl:  # the discriminator's health
        for k, c in (("d_acc", "C7"), ("d_signal", "C3"), ("ref_sim", "C2")):
            if pts := [(r["epoch"], r[k]) for r in rows if k in r]:
                h.plot(*zip(*pts), color=c, lw=1, label=f"{k} (bottom)")
        for k, c, what in (("d_noise_warning", "C3", "reward-is-noise"), ("drift_warning", "C2", "drift")):
            if warned := [r["epoch"] for r in rows if r.get(k)]:
                h.plot(warned, [-0.2] * len(warned), "v", color=c, label=f"{what} warning")
        h.axhline(0.5, color="C7", lw=0.5, ls=":")
        h.set(ylabel="discriminator", ylim=(-0.3, 1.05))
    (hl or [fd])[0].set(xlabel="epoch (held-out: epochs done)")
    fig.suptitle(f"{run}{': ' if run else ''}training reward against held-out metrics")
    fig.legend(loc="outside right upper", fontsize=8)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def monitor(history, since_eval, version, row):
    """The reward-hacking monitor, at each evaluation: pair the newest one with the mean training reward
    since the previous one (one epoch's reward is too noisy), counting only epochs scored by the reward
    function the generator now sees (`version`: discriminator steps so far; constant for fixed rewards),
    and check the pattern (hacking_warning): a warning is printed and marks the logged `row`.
    Empties since_eval."""
    same = [r for r, v in since_eval if v == version]
    since_eval.clear()
    if same:
        history[-1] = (float(np.mean(same)), history[-1][1], version)
        if warning := hacking_warning(history):
            print(f"WARNING {warning}", flush=True)
            row["hacking_warning"] = 1


def hacking_warning(history, window=3):
    """Reward hacking, operationally: under one and the same reward function, the training reward rose while
    a held-out quality measure got worse (toy GenEval or paired DINO similarity down by > 0.01, FD-DINO to
    the references up by > 5 %), from the oldest to the newest of the last `window` evaluations. `history`:
    per evaluation (training reward averaged since the previous one, {metric: value}[, reward version: in
    train.py the discriminator steps so far]). A discriminator that trains every epoch is a new reward every
    epoch: two evaluations are not comparable, so the monitor stays silent for it by construction."""
    same = [h for h in history if h[2:] == history[-1][2:]][-window:]
    if len(same) < 2:
        return None
    old, new = same[0], same[-1]
    worse = [k for k in ("toy_geneval", "dino_sim")
             if k in new[1] and k in old[1] and new[1][k] < old[1][k] - 0.01]
    worse += [k for k in ("fd_dino",) if k in new[1] and k in old[1] and new[1][k] > 1.05 * old[1][k]]
    if new[0] > old[0] and worse:
        return (f"reward hacking? training reward {old[0]:.4f} → {new[0]:.4f} while held-out "
                + ", ".join(f"{k} {old[1][k]:.3f} → {new[1][k]:.3f}" for k in worse)
                + f" over the last {len(same)} evaluations")
    return None


def read_metrics(path, warn=print):
    """The rows (JSON objects) of metrics.jsonl; a torn line (a kill or a full disk mid-write) or one that
    is not an object is dropped with a warning. A folder in its place is refused in one line."""
    if os.path.isdir(path):
        raise SystemExit(f"{path} is a folder, not a run's metrics file")
    rows = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f.read().split(b"\n"), 1):
            try:
                text = raw.decode("utf-8").strip().strip("\x00")
            except UnicodeDecodeError:  # bytes replaced, it would pass for a row it is not
                warn(f"WARNING {path}:{i}: dropped a line that is not UTF-8 text")
                continue
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


# -----------------------------------------------------------------------------------------------
# In the training loop

# The discriminator's health, two questions every epoch (the log says it before the held-out metrics drift):
# - is its reward noise? d_signal (train.reward_signal) below SIGNAL_LOW for SIGNAL_PATIENCE generator epochs
#   in a row. A split-half pair whose groups share no signal still correlates by chance, with a std of about
#   1/sqrt(images): 0.1 at 96 images an epoch, so 0.2 is two of those.
# - do the generations leave the references? ref_sim (their cosine to their references in φ, a fixed
#   yardstick beside the moving head), smoothed as m ← 0.7·m + 0.3·ref_sim, more than DRIFT below the best m
#   of the generator's epochs so far. In the shapes world ref_sim moves by ±0.015 an epoch when nothing
#   happens (0.006 after smoothing): 0.03 is five of those.
SIGNAL_LOW, SIGNAL_PATIENCE, DRIFT = 0.2, 5, 0.03


def watch_health(d_signal, ref_sim, trained_g, counters, row, master):
    """Log d_signal in `row`, and say (marking the row) when the reward has been noise for SIGNAL_PATIENCE
    generator epochs, and when the generations have drifted from the references (every SIGNAL_PATIENCE
    generator epochs while it lasts). The counts and the smoothed ref_sim live in `counters` (checkpoints)."""
    row["d_signal"] = d_signal
    if not trained_g:
        return
    counters["noisy_g_epochs"] = counters["noisy_g_epochs"] + 1 if d_signal < SIGNAL_LOW else 0
    if counters["noisy_g_epochs"] and counters["noisy_g_epochs"] % SIGNAL_PATIENCE == 0:
        row["d_noise_warning"] = 1
        if master:
            print(f"WARNING the adversarial reward is mostly noise: d_signal < {SIGNAL_LOW} for the last "
                  f"{counters['noisy_g_epochs']} generator epochs (now {d_signal:.2f}, D acc "
                  f"{row.get('d_acc', float('nan')):.2f}): a second discriminator does not reproduce its "
                  "ranking, and the generator's steps follow it (adv_signal=True scales them by d_signal)",
                  flush=True)
    if ref_sim is None:
        return
    m = ref_sim if counters["ref_sim_smooth"] is None else 0.7 * counters["ref_sim_smooth"] + 0.3 * ref_sim
    best = max(m, counters["ref_sim_best"] or m)
    counters.update(ref_sim_smooth=m, ref_sim_best=best,
                    drift_g_epochs=(counters["drift_g_epochs"] + 1) * (m < best - DRIFT))
    if counters["drift_g_epochs"] % SIGNAL_PATIENCE == 1:
        row["drift_warning"] = 1
        if master:
            print(f"WARNING the generations are leaving the references: ref_sim {m:.3f} (smoothed) against "
                  f"{best:.3f} at best, while the generator trains on the discriminator's reward (D acc "
                  f"{row.get('d_acc', float('nan')):.2f}, d_signal {d_signal:.2f}); held-out quality "
                  "usually follows: keep an earlier checkpoint", flush=True)


EVAL_KEYS = ("pretrained", "t5", "max_sequence_length", "resolution", "mixed_precision", "compile",
             "low_mem", "test_prompts", "references", "reference_root", "dino_backbone", "dino_weights",
             "dino_kwargs", "dino_image_size", "eval_num_steps", "eval_guidance_scale", "eval_n_per_prompt",
             "eval_max_prompts")


def settings(cfg):
    """What a held-out evaluation of given weights depends on, as one string logged beside its numbers."""
    return json.dumps({k: getattr(cfg, k) for k in EVAL_KEYS}, sort_keys=True)


def evaluate(cfg, gen, features, references, test_prompts, epoch, history, rank=0, written=None):
    """Rank 0 generates the held-out set with the EMA weights and measures it; the others wait.
    `features`: the DINO φ (or None). Returns {"eval/<metric>": value}. `written` {epoch: those values}:
    evaluations a run wrote before its resume, taken as they are (the same weights, the same seeds)."""
    if ev := (written or {}).get(epoch, {}) if rank == 0 else {}:
        history.append((float("nan"), {k[5:]: v for k, v in ev.items() if k.startswith("eval/")}))
        print(f"eval @ epoch {epoch}: as written before the resume (metrics.jsonl, samples/)", flush=True)
    elif rank == 0:
        prompts = [p for p in test_prompts for _ in range(cfg.eval_n_per_prompt)]
        images = generate(gen, prompts, seed=0, num_steps=cfg.eval_num_steps,  # same noise in every run
                          guidance_scale=cfg.eval_guidance_scale)
        m, skipped = measure(images, prompts, references, features)
        ev = {**{f"eval/{k}": v for k, v in m.items()}, "eval_settings": settings(cfg)}
        os.makedirs(os.path.join(cfg.out_dir, "samples"), exist_ok=True)  # every image, a row per prompt
        title = (f"{os.path.basename(os.path.abspath(cfg.out_dir))}: held-out, epoch {epoch} (EMA weights), "
                 f"{cfg.eval_num_steps} steps, CFG {cfg.eval_guidance_scale}")
        save_grid(images, os.path.join(cfg.out_dir, "samples", f"epoch_{epoch:06d}.png"),
                  cfg.eval_n_per_prompt, prompts, title)
        history.append((float("nan"), m))
        print(f"eval @ epoch {epoch}: " + " ".join(f"{k} {v:.4f}" for k, v in m.items())
              + "".join(f" | no {k}: {why}" for k, why in skipped.items() if "grammar" not in why),
              flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return ev


def report(out_dir, g_steps=None, k=5):
    """End of run: curves, and the before/after numbers of the held-out evaluation (first vs last, each
    named by the epochs done, as its grid in samples/ and its checkpoint), plus the training reward
    (mean of the first vs the last k epochs that trained the generator). Writes summary.json."""
    path = os.path.join(out_dir, "metrics.jsonl")
    rows = read_metrics(path)
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    plot_curves(path, os.path.join(out_dir, "curves.png"), run=os.path.basename(os.path.abspath(out_dir)))
    if g_steps == 0:
        print("the generator was never updated (0 G steps: every epoch went to the discriminator, e.g. "
              "epochs ≤ d_warmup): the before and after numbers are both the base model's")
    if len(evals) < 2:
        return
    first, last = evals[0], evals[-1]
    summary = {k[5:]: dict(before=first[k], after=last[k])
               for k in last if k.startswith("eval/") and k in first}
    trained = [r["reward_mean"] for p, r in zip([{}, *rows], rows)
               if r.get("g_epochs", 0) > p.get("g_epochs", 0)]  # the epochs that trained the generator
    if len(trained) >= 2:  # the first and the last k G epochs; fewer than 2k: two halves, never overlapping
        k = min(k, len(trained) // 2)
        summary["train_reward"] = dict(before=float(np.mean(trained[:k])), after=float(np.mean(trained[-k:])))
    summary["epochs"] = dict(before=first["epoch"], after=last["epoch"])
    json.dump(summary, open(os.path.join(out_dir, "summary.json"), "w"), indent=1)
    print(f"held-out before (epoch {first['epoch']}) → after (epoch {last['epoch']}):\n" + "\n".join(
        f"  {k:20s} {v['before']:.4f} → {v['after']:.4f}" for k, v in summary.items()
        if k not in ("epochs", "train_reward")))
    if t := summary.get("train_reward"):  # not held out: said apart
        print(f"training reward, first {k} → last {k} G epochs: {t['before']:.4f} → {t['after']:.4f}")


if __name__ == "__main__":  # an earlier README's command: say where it went (exit 1 unless asked for help)
    import sys
    print("the evaluation command is sample.py now: python sample.py --ckpt RUN_OR_CHECKPOINT (--help)")
    sys.exit(0 if sys.argv[1:2] in (["-h"], ["--help"]) else 1)
