"""GRPO against DiffusionNFT on the shapes world: held-out toy GenEval and FD-DINO against compute and
against images sampled, from finished runs (their config.json and metrics.jsonl).

    python docs/tiny_nft_study.py docs/tiny_nft.png --cpu grpo=3.1,nft=4.0,warmup=1.2 \\
        "GRPO, oracle=out/orc_s1,out/orc_s2" "NFT, oracle=out/nftorc_s1,out/nftorc_s2" ...

--cpu gives the CPU seconds (one thread) of one epoch with a generator step for each objective, and of a
warm-up epoch (sampling, scoring and the discriminator only: `warmup`, or `warmup_grpo` / `warmup_nft`
when the objectives sample differently, NFT without CFG). They are measured apart from the study's
runs (`/usr/bin/time`, runs of 1 and 6 epochs without evaluation: the difference over 5 epochs), because
the study's runs shared the machine with other work and their wall-clock seconds are not comparable.
The x axis "compute" is then the cumulative CPU seconds of the epochs before each evaluation; the
evaluations themselves are left out (identical for both objectives).

Prints one table: for each group its held-out numbers at the end of the budget (mean ± std over seeds),
and, for each NFT group, the compute and images at which its mean gain first reaches the mean end gain of
the GRPO group with the same reward (its name after the comma), as a fraction of GRPO's budget."""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def trace(run, cpu):
    """(epoch, compute, images, toy GenEval, FD-DINO, flagged) at each evaluation of one run."""
    cfg = json.load(open(os.path.join(run, "config.json")))
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    per_epoch = cfg["prompts_per_epoch"] * cfg["group_size"]
    cost, g_before, out = 0.0, 0, []
    for r in rows:
        if "eval/toy_geneval" in r:
            out.append((r["epoch"], cost, r["epoch"] * per_epoch, r["eval/toy_geneval"],
                        r.get("eval/fd_dino", np.nan)))  # an oracle run measures no FD-DINO in the loop
        if "g_epochs" in r:  # a training epoch: did the generator step?
            cost += (cpu[cfg["objective"]] if r["g_epochs"] > g_before
                     else cpu.get(f"warmup_{cfg['objective']}", cpu.get("warmup", 0.0)))
            g_before = r["g_epochs"]
    flagged = any(r.get("hacking_warning") for r in rows)
    return np.array(out), flagged


def group(runs, cpu):
    traces = [trace(r, cpu) for r in runs]
    n = min(len(t) for t, _ in traces)
    arr = np.stack([t[:n] for t, _ in traces])  # (seeds, evals, 5)
    return arr, sum(f for _, f in traces)


def main(out, cpu, groups):
    data = {name: group(runs, cpu) for name, runs in groups}
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    for c, (name, (arr, _)) in enumerate(data.items()):
        style = dict(color=f"C{c // 2}", ls="-" if name.startswith("NFT") else "--")
        for ax, (x, y, xl, yl) in zip(axes, [(1, 3, "compute (CPU s, 1 thread)", "held-out toy GenEval"),
                                             (2, 3, "images sampled", "held-out toy GenEval"),
                                             (1, 4, "compute (CPU s, 1 thread)", "held-out FD-DINO ↓"),
                                             (2, 4, "images sampled", "held-out FD-DINO ↓")]):
            mean = arr[..., y].mean(0)
            ax.plot(arr[0, :, x], mean, lw=2, label=f"{name} ({len(arr)} seeds)", **style)
            ax.fill_between(arr[0, :, x], arr[..., y].min(0), arr[..., y].max(0), alpha=0.12,
                            color=style["color"])
            ax.set_xlabel(xl)
            ax.set_ylabel(yl)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("GRPO (dashed) vs DiffusionNFT (solid) on the shapes world, from the flawed base: "
                 "mean over seeds, band = min..max")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"wrote {out}\n")
    print("| group | seeds | toy GenEval base → end | gain | FD-DINO base → end | flagged | "
          "toy GenEval at ⅓ of GRPO's compute | reaches GRPO's end gain at |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (arr, flagged) in data.items():
        gain = arr[:, -1, 3] - arr[:, 0, 3]
        reach, third = "–", "–"
        ref = next((a for n, (a, _) in data.items()
                    if n.startswith("GRPO") and n.split(",")[1:] == name.split(",")[1:]), None)
        if ref is not None:  # the last evaluation within a third of GRPO's whole budget
            k = np.nonzero(arr[0, :, 1] <= ref[0, -1, 1] / 3)[0][-1]
            third = f"{arr[:, k, 3].mean():.3f} (epoch {arr[0, k, 0]:.0f})"
        if name.startswith("NFT") and ref is not None:
            target = (ref[:, -1, 3] - ref[:, 0, 3]).mean()
            mean_gain = arr[..., 3].mean(0) - arr[:, 0, 3].mean()
            hit = np.nonzero(mean_gain >= target)[0]
            reach = ("not within the budget" if not len(hit) else
                     f"epoch {arr[0, hit[0], 0]:.0f}: {arr[0, hit[0], 1] / ref[0, -1, 1]:.2f} of GRPO's "
                     f"compute, {arr[0, hit[0], 2] / ref[0, -1, 2]:.2f} of its images")
        print(f"| {name} | {len(arr)} | {arr[:, 0, 3].mean():.3f} → {arr[:, -1, 3].mean():.3f} ± "
              f"{arr[:, -1, 3].std():.3f} | {gain.mean():+.3f} ({(gain > 0).sum()}/{len(gain)} up) | "
              + ("– (oracle runs load no ViT)" if np.isnan(arr[:, -1, 4]).any() else
                 f"{arr[:, 0, 4].mean():.2f} → {arr[:, -1, 4].mean():.2f} ± {arr[:, -1, 4].std():.2f}") + " | "
              f"{flagged} of {len(arr)} | {third} | {reach} |")


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) < 4 or args[1] != "--cpu" or any("=" not in a for a in args[2:]):
        raise SystemExit(__doc__)
    cpu = {k: float(v) for k, v in (kv.split("=") for kv in args[2].split(","))}
    main(args[0], cpu, [(a.split("=", 1)[0], a.split("=", 1)[1].split(",")) for a in args[3:]])
