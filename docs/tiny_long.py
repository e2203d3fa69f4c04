"""The 60-epoch study's table and figure from finished runs (their metrics.jsonl):

    python docs/tiny_long.py docs/tiny_long.png "Adv-GRPO=out/long_s0,out/long_s1" "lr_half_life=10=out/hl10_s0"

(a group is NAME=RUN,RUN,...; the name may hold "=")

Prints one Markdown row per run: held-out toy GenEval and FD-DINO at its best, at epoch 30 and at the end,
whether the end is within the target of its own best (0.5 FD-DINO and 0.03 toy GenEval), and the epochs
at which held-out quality first fell by more than that below its best so far, and the epochs at which the
health warnings fired. The figure: FD-DINO and toy GenEval against epoch, one colour per group
(thin lines: single seeds, thick: their mean)."""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

FD, TOY = 0.5, 0.03  # the target: the end within this much of the run's own best
WARNINGS = ("d_noise_warning", "drift_warning", "hacking_warning")


def evals(run):
    """{epoch: row} of the held-out evaluations, and the epochs at which each warning fired."""
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl")) if line.strip()]
    ev = {r["epoch"]: r for r in rows if "eval/toy_geneval" in r}
    fired = {w: [r["epoch"] for r in rows if r.get(w)] for w in WARNINGS}
    if not any("drift_g_epochs" in r for r in rows):  # a run made before the health warnings existed
        fired["d_noise_warning"] = fired["drift_warning"] = None
    return ev, fired


def row(name, run):
    ev, fired = evals(run)
    ep = sorted(ev)
    fd = np.array([ev[e]["eval/fd_dino"] for e in ep])
    toy = np.array([ev[e]["eval/toy_geneval"] for e in ep])
    at30 = ev.get(30, {})
    ok = fd[-1] - fd.min() <= FD and toy.max() - toy[-1] <= TOY
    # the first evaluation at which held-out quality fell by more than the target below its best so far
    fell = [e for i, e in enumerate(ep) if toy[:i + 1].max() - toy[i] > TOY or fd[i] - fd[:i + 1].min() > FD]
    warn = "; ".join(f"{w.split('_')[0]} @{','.join(map(str, e[:3]))}" for w, e in fired.items() if e) or \
        "quiet" + (" (hacking monitor; health warnings not yet logged)" if fired["drift_warning"] is None else "")
    return (f"| {name} | {os.path.basename(run)} | {ep[-1]} | {toy.max():.3f} (ep {ep[int(toy.argmax())]}) | "
            f"{at30.get('eval/toy_geneval', float('nan')):.3f} | {toy[-1]:.3f} | "
            f"{fd.min():.2f} (ep {ep[int(fd.argmin())]}) | {at30.get('eval/fd_dino', float('nan')):.2f} | "
            f"{fd[-1]:.2f} | {'yes' if ok else 'no'} | {fell[0] if fell else '-'} | {warn} |")


def main(out, groups):
    print("| group | run | last epoch | toy best | toy @30 | toy end | FD best | FD @30 | FD end | "
          "end within target | first fall | warnings (first epochs) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for c, (name, runs) in enumerate(groups):
        curves = []
        for run in runs:
            print(row(name, run))
            ev, _ = evals(run)
            ep = sorted(ev)
            curves.append((ep, [ev[e]["eval/fd_dino"] for e in ep], [ev[e]["eval/toy_geneval"] for e in ep]))
            for ax, k in zip(axes, (1, 2)):
                ax.plot(ep, curves[-1][k], color=f"C{c}", lw=0.7, alpha=0.5)
        n = min(len(e) for e, _, _ in curves)  # the mean over the epochs every seed reached
        for ax, k in zip(axes, (1, 2)):
            ax.plot(curves[0][0][:n], np.mean([cv[k][:n] for cv in curves], 0), color=f"C{c}", lw=2.2,
                    label=f"{name} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
    for ax, title in zip(axes, ("FD-DINO to the references (lower is better)", "held-out toy GenEval")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.axvline(30, color="grey", lw=0.6, ls=":")  # make demo's budget
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], [(g.rsplit("=", 1)[0], g.rsplit("=", 1)[1].split(",")) for g in sys.argv[2:]])
