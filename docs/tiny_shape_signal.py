"""Which reward can tell a right image from a wrong one? (the shapes world, README "Results")

    python docs/tiny_shape_signal.py [PRESET] [--judge=correct|shape|count|colour|position] [--key=value ...]
    python docs/tiny_shape_signal.py                                   # config/tiny.py: the flawed base
    python docs/tiny_shape_signal.py config/tiny.py --pretrained=assets/tinyworld/pipeline_early --judge=shape

GRPO only learns from differences *within* a prompt's group: a reward raises accuracy only if, among
images of the same prompt, it scores the right ones above the wrong ones. This samples 8 images for
each of the first 72 training prompts from the preset's base (ODE, CFG as in its evaluation), judges
them with the exact analyser (`--judge`: the whole toy GenEval verdict, the default, or one attribute
of it, e.g. shape for the early base's binding errors), and prints for each reward
the within-prompt AUC: the share of (correct, wrong) pairs of one prompt that it orders correctly
(1 = always, 0.5 = chance), and its mean within-group standard deviation (how loud it is in a sum).
Rewards: the discriminator head (the paper's unconditional one) trained 5 / 30 / 100 steps on these
images against the references, as in a run's warm-up; the paired DINO similarity (`dino_sim`); the two
added (head + w · dino_sim); and the prompt-aware head (--d_conditional) given the hardest wrong-prompt
negatives this world has: references of a training prompt that differs only in shape; and the paper's
head on raw pixels instead of the ViT (tokens = 4×4 pixel patches, CLS = their mean), to tell a limit
of the stand-in ViT from a limit of any unconditional discriminator. The rule reward `toy_geneval` is the
ceiling (AUC 1 by definition). ~5 min on one core."""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data  # noqa: E402
import eval as E  # noqa: E402
import model as M  # noqa: E402
import reward as R  # noqa: E402
import tinyworld as tw  # noqa: E402
from configurator import parse_args  # noqa: E402


def within_group_auc(scores, correct, group):
    """AUC over pairs (i correct, j wrong) of the same group: P(score_i > score_j), ties count ½.
    scores (B,), correct (B,) bools, group (B,) ids. NaN when no group has both kinds."""
    wins = []
    for g in np.unique(group):
        s, c = scores[group == g], correct[group == g]
        if c.any() and (~c).any():
            d = s[c][:, None] - s[~c][None, :]                  # (n_correct, n_wrong)
            wins.append(((d > 0) + 0.5 * (d == 0)).ravel())
    return float(np.concatenate(wins).mean()) if wins else float("nan")


class PixelTokens(torch.nn.Module):
    """A "backbone" with no learned features: tokens = the image's 4×4 pixel patches, CLS = their mean."""
    num_features = 48

    def __init__(self):
        super().__init__()
        self.dtype_of = torch.nn.Parameter(torch.zeros(0))  # no weights; DinoFeatures reads the dtype here

    def forward_features(self, x):                                     # (B, 3, H, W) normalised
        patches = torch.nn.functional.unfold(x, 4, stride=4).transpose(1, 2)  # (B, N, 48)
        return torch.cat([patches.mean(1, keepdim=True), patches], dim=1)     # (B, 1 + N, 48)


def main(argv, n_prompts=72, n_per=8):
    torch.set_num_threads(1)
    judge = next((a.split("=", 1)[1] for a in argv if a.startswith("--judge=")), "correct")
    argv = [a for a in argv if not a.startswith("--judge=")]
    cfg = parse_args(argv if argv and not argv[0].startswith("--") else ["config/tiny.py", *argv])
    gen = M.build_generator(cfg, torch.device("cpu"))
    prompts = [p["prompt"] for p in data.load_prompts(cfg.train_prompts)][:n_prompts]
    P = [p for p in prompts for _ in range(n_per)]
    images = E.generate(gen, P, seed=5, num_steps=cfg.eval_num_steps, guidance_scale=cfg.eval_guidance_scale,
                        use_ema=False)
    correct = np.array([tw.analyse(im, p)[judge] for im, p in zip(images, P)])
    group = np.repeat(np.arange(n_prompts), n_per)
    refs = data.ReferenceSet.from_index(cfg.references, size=cfg.resolution)
    head = R.build_adversary(cfg, torch.device("cpu"))
    fake = head.phi(images)
    real = [head.phi(refs.images_of(p)) for p in prompts]
    sim = R.paired_cosine(fake[0], P, {p: r[0] for p, r in zip(prompts, real)}).numpy()
    real_cls, real_patches = torch.cat([r[0] for r in real]), torch.cat([r[1] for r in real])
    print(f"{len(P)} images of {n_prompts} training prompts; {judge} accuracy {correct.mean():.3f}; "
          f"{int(sum((correct[group == c].sum() * (~correct[group == c]).sum()) for c in range(n_prompts)))} "
          f"(correct, wrong) pairs")
    print(f"{'reward':50s} within-prompt AUC   within-group std")
    print(f"{'dino_sim (paired DINO similarity)':50s} {within_group_auc(sim, correct, group):.3f}"
          f"{sim.reshape(n_prompts, n_per).std(1, ddof=1).mean():18.4f}")
    # the prompt-aware head: each image's prompt embedding; wrong = a reference of the same scene, other shape
    pool = gen.encode(P)[1]                                                              # (B, P)
    scene = [tw.parse(p) for p in prompts]
    other_shape = [[b for b, o in enumerate(scene) if o != s and (o.colour, o.position, o.size)
                    == (s.colour, s.position, s.size)] for s in scene]  # among these training prompts
    cond = R.DinoDiscriminator(head.phi, lr=cfg.d_lr, seed=cfg.seed, cond_dim=pool.shape[1])
    pixels = R.DinoFeatures(PixelTokens(), cfg.resolution)
    pix = R.DinoDiscriminator(pixels, lr=cfg.d_lr, seed=cfg.seed)
    pix_fake = pixels(images)
    pix_real = [torch.cat(t) for t in zip(*(pixels(refs.images_of(p)) for p in prompts))]  # as real_cls, ..
    n, k = cfg.group_size * cfg.prompts_per_epoch, len(real[0][0])  # batch size; references per prompt
    assert all(len(r[0]) == k for r in real), "the shapes world has as many references for every prompt"
    g, done = torch.Generator().manual_seed(0), 0
    any_ref_of = lambda q: q * k + int(torch.randint(k, (1,), generator=g))  # noqa: E731 (row of real_cls)
    for steps in (5, 30, 100):
        for _ in range(steps - done):  # batches of the run's size, images drawn at random
            i = torch.randint(len(P), (n,), generator=g)
            q = group[i.numpy()]                                   # their prompts
            j = [any_ref_of(a) for a in q]                         # references of the same prompts: real
            head.d_step((real_cls[j], real_patches[j]), (fake[0][i], fake[1][i]))
            pix.d_step((pix_real[0][j], pix_real[1][j]), (pix_fake[0][i], pix_fake[1][i]))
            keep = [m for m, a in enumerate(q) if other_shape[a]]  # wrong: the same scene in another shape
            wrong = [any_ref_of(other_shape[q[m]][int(torch.randint(len(other_shape[q[m]]), (1,),
                                                                     generator=g))]) for m in keep]
            cond.d_step((real_cls[j], real_patches[j], pool[i]), (fake[0][i], fake[1][i], pool[i]),
                        wrong=(real_cls[wrong], pool[i][keep]))
        done = steps
        s = head.score(*fake, generator=torch.Generator().manual_seed(1)).numpy()
        print(f"{f'discriminator head, {steps} steps':50s} {within_group_auc(s, correct, group):.3f}"
              f"{s.reshape(n_prompts, n_per).std(1, ddof=1).mean():18.4f}")
        for w in (1, 10):
            print(f"{f'  + {w} x dino_sim':50s} {within_group_auc(s + w * sim, correct, group):.3f}")
        s = pix.score(*pix_fake, generator=torch.Generator().manual_seed(1)).numpy()
        print(f"{f'the head on raw pixels, {steps} steps':50s} {within_group_auc(s, correct, group):.3f}"
              f"{s.reshape(n_prompts, n_per).std(1, ddof=1).mean():18.4f}")
        s = cond.score(*fake, pool, generator=torch.Generator().manual_seed(1)).numpy()
        print(f"{f'prompt-aware head, hardest negatives, {steps} steps':50s} "
              f"{within_group_auc(s, correct, group):.3f}"
              f"{s.reshape(n_prompts, n_per).std(1, ddof=1).mean():18.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
