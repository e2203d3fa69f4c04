"""The README's shapes-world figure from finished runs (their samples/ grids and metrics.jsonl):

    python docs/tiny_figure.py docs/tiny_demo.png adversarial=out/adv_s0,out/adv_s1 frozen=out/frozen_s0

Left: the same held-out prompts (six rows of the labelled grids: several sizes, shapes and colours)
before training and after it, for the first run of each group. Right: the training reward, held-out toy
GenEval and FD-DINO to the references against epoch, the mean of each group's runs (thin lines: single
seeds)."""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval as E  # noqa: E402

ROWS = (0, 10, 20, 31, 42, 53)  # held-out prompts shown from the grids of 54 (sizes, shapes, colours)


def rows_of(grid_png, rows=ROWS, prompts=54, n=4, h=32):
    """The chosen prompts' blocks (caption and n images) of a labelled grid (eval.save_grid), stacked."""
    im = np.asarray(Image.open(grid_png).convert("RGB"))
    _, cols, bw, bh = E.grid_layout(prompts, n, h)
    top = im.shape[0] - -(-prompts // cols) * bh  # the title band above the blocks
    y, x = top + np.array(rows) // cols * bh, np.array(rows) % cols * bw
    return np.concatenate([im[a:a + bh, b:b + bw] for a, b in zip(y, x)])


def curves(run, key, smooth=5):
    rows = map(json.loads, open(os.path.join(run, "metrics.jsonl")))
    xy = np.array([(m["epoch"], m[key]) for m in rows if key in m])
    if key == "reward_mean":  # one epoch's mean reward is noisy: a running mean over `smooth` epochs
        xy = np.stack([xy[smooth - 1:, 0], np.convolve(xy[:, 1], np.ones(smooth) / smooth, "valid")], 1)
    return xy


def main(out, groups):
    last = max(int(f[6:12]) for f in os.listdir(os.path.join(groups[0][1][0], "samples")))
    panels = [("base (epoch 0)", rows_of(os.path.join(groups[0][1][0], "samples", "epoch_000000.png")))]
    panels += [(f"{name} (epoch {last})", rows_of(os.path.join(runs[0], "samples", f"epoch_{last:06d}.png")))
               for name, runs in groups]
    fig = plt.figure(figsize=(4 * len(panels) + 12, 5))
    for i, (title, im) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels) + 3, i + 1)
        ax.imshow(im)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    plots = [("reward_mean", "training reward, 5-epoch mean (adversarial: D moves)"),
             ("eval/toy_geneval", "held-out toy GenEval"),
             ("eval/fd_dino", "held-out FD-DINO to the references")]
    for j, (key, label) in enumerate(plots):
        ax = fig.add_subplot(1, len(panels) + len(plots), len(panels) + j + 1)
        for c, (name, runs) in enumerate(groups):
            cs = [curves(r, key) for r in runs]
            n = min(len(x) for x in cs)
            for x in cs:
                ax.plot(x[:n, 0], x[:n, 1], color=f"C{c}", lw=0.5, alpha=0.5)
            ax.plot(cs[0][:n, 0], np.mean([x[:n, 1] for x in cs], 0), color=f"C{c}", lw=2,
                    label=f"{name} ({len(runs)} seeds)")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) < 3 or any("=" not in a for a in sys.argv[2:]):
        raise SystemExit(__doc__)
    main(sys.argv[1], [(a.split("=", 1)[0], a.split("=", 1)[1].split(",")) for a in sys.argv[2:]])
