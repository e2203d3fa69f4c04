"""The discriminator's health (d_signal: its split-half pair's agreement; ref_sim) and the options that keep
it informative (adv_signal, adv_std, g_beta1, d_steps_max, d_replay, d_r1): measured numbers, warnings,
curves, and an exact resume with all of them on."""
import os
import types

import numpy as np
import pytest
import torch
from PIL import Image

import eval as E
import train as T
from reward import DinoDiscriminator, DinoFeatures
from test_reward import IMG, tiny_vit
from test_train import _run, _weights


def test_reward_signal_is_the_share_of_within_group_variance_two_scores_share():
    g = torch.Generator().manual_seed(0)
    groups = [i // 16 for i in range(4096)]
    signal = torch.randn(4096, generator=g)
    for noise_sd, share in ((0.0, 1.0), (1.0, 0.5), (3.0, 0.1)):
        split = torch.stack([signal + noise_sd * torch.randn(4096, generator=g) for _ in range(2)], 1)
        assert abs(T.reward_signal(split, groups) - share) < 0.04
    pure_noise = torch.randn(4096, 2, generator=g)
    assert abs(T.reward_signal(pure_noise, groups)) < 0.05
    offsets = torch.arange(4096.0)[:, None] // 16 * torch.ones(1, 2)  # differences *between* groups only
    assert T.reward_signal(offsets, groups) == 0.0                   # advantages never see them


def _images(brightness):
    return torch.stack([torch.full((3, 32, 32), float(b)) for b in brightness])


def _judge(disc, fake, real, steps=0):
    half = torch.arange(len(fake)) % 2
    _, _, d_batch, _ = disc.judge(fake, real, [""] * len(fake), None, None, half)
    disc.update(d_batch, steps)  # φ once, as in a run: the steps reuse the epoch's features
    return disc.judge(fake, real, [""] * len(fake), None, None, half)


def test_d_signal_is_zero_for_identical_images_and_high_for_a_discriminator_that_separates():
    groups = [i // 8 for i in range(32)]
    fresh = DinoDiscriminator(DinoFeatures(tiny_vit(), IMG), lr=1e-3, seed=0)
    same = _images([0.3] * 32)  # every group: one image 8 times
    _, split, _, _ = _judge(fresh, same, _images([0.9] * 32))
    assert T.reward_signal(split, groups) == 0.0
    # references bright, generations of varied brightness: both heads of the pair learn "brighter is more
    # real" from disjoint halves, so they rank each group alike
    disc = DinoDiscriminator(DinoFeatures(tiny_vit(), IMG), lr=1e-3, seed=0)
    fake = _images(np.linspace(0.05, 0.6, 32)[torch.randperm(32, generator=torch.Generator().manual_seed(1))])
    _, split, _, _ = _judge(disc, fake, _images([0.95] * 32), steps=60)
    assert T.reward_signal(split, groups) > 0.8


def test_the_pair_changes_nothing_of_the_papers_head():
    """The split-half pair trains beside the head in one backward: the head's steps are bitwise those of a
    discriminator without it (the runs before it are reproduced exactly)."""
    fake, real = _images(np.linspace(0.1, 0.5, 8)), _images([0.9] * 8)
    with_pair, without = (DinoDiscriminator(DinoFeatures(tiny_vit(), IMG), lr=1e-3) for _ in range(2))
    for _ in range(3):
        _, _, d_batch, _ = with_pair.judge(fake, real, [""] * 8, None, None, torch.arange(8) % 2)
        with_pair.update(d_batch, 1)
        _, _, d_batch, _ = without.judge(fake, real, [""] * 8, None, None, None)
        without.update(d_batch, 1)
    assert all(torch.equal(a, b) for a, b in zip(with_pair.head.parameters(), without.head.parameters()))
    assert not torch.equal(with_pair.pair[0][0].weight, without.pair[0][0].weight)  # the pair did learn


def _counters():
    return dict(noisy_g_epochs=0, drift_g_epochs=0, ref_sim_smooth=None, ref_sim_best=None)


def test_the_noise_warning_comes_after_patience_low_generator_epochs_and_marks_the_row(capsys):
    counters, rows = _counters(), []
    for epoch in range(2 * E.SIGNAL_PATIENCE):
        row = dict(d_acc=0.5)
        E.watch_health(0.05, None, True, counters, row, master=True)
        rows.append(row)
    out = capsys.readouterr().out
    assert out.count("WARNING the adversarial reward is mostly noise") == 2
    assert [i for i, r in enumerate(rows) if r.get("d_noise_warning")] == [E.SIGNAL_PATIENCE - 1,
                                                                            2 * E.SIGNAL_PATIENCE - 1]
    E.watch_health(0.9, None, True, counters, {}, master=True)   # signal back: the count starts again
    E.watch_health(0.05, None, False, counters, {}, master=True)  # a D-only epoch does not count
    assert counters["noisy_g_epochs"] == 0


def test_the_drift_warning_sees_generations_leave_the_references_not_epoch_noise(capsys):
    """ref_sim as the shapes world's runs show it: ±0.015 around 0.95 while the run holds (no warning), then
    a slide to 0.85 (warned within a few epochs of the slide, again every SIGNAL_PATIENCE epochs)."""
    g = np.random.default_rng(0)
    steady = 0.95 + 0.015 * g.standard_normal(30)
    slide = np.linspace(0.95, 0.85, 10) + 0.015 * g.standard_normal(10)
    counters, warned = _counters(), []
    for epoch, r in enumerate([*steady, *slide, *[0.85] * 10]):
        row = {}
        E.watch_health(0.9, float(r), True, counters, row, master=True)
        warned += [epoch] * row.get("drift_warning", 0)
    assert warned and 30 < warned[0] <= 36 and warned[1] - warned[0] == E.SIGNAL_PATIENCE
    assert "generations are leaving the references" in capsys.readouterr().out


def test_step_scale_and_raw_advantages():
    on = types.SimpleNamespace(adv_signal=True, adv_gap=False)
    assert [T.step_scale(on, s, 0.2) for s in (-0.3, 0.4, 1.7, None)] == [0.0, 0.4, 1.0, 1.0]
    off = types.SimpleNamespace(adv_signal=False, adv_gap=False)
    assert T.step_scale(off, 0.1, 0.1) == 1.0
    gap = types.SimpleNamespace(adv_signal=False, adv_gap=True)
    assert [T.step_scale(gap, 0.1, g) for g in (-0.5, 0.25, 3.0, None)] == [0.0, 0.25, 1.0, 1.0]
    both = types.SimpleNamespace(adv_signal=True, adv_gap=True)
    assert T.step_scale(both, 0.5, 0.4) == pytest.approx(0.2)
    r = torch.tensor([1.0, 3.0, 10.0, 14.0])
    assert T.compute_advantages(r, [0, 0, 1, 1], std=False).tolist() == [-1.0, 1.0, -2.0, 2.0]


def test_d_steps_max_follows_the_heads_accuracy_on_new_generations():
    disc = DinoDiscriminator(DinoFeatures(tiny_vit(), IMG))
    cfg = types.SimpleNamespace(d_warmup=2, schedule="shared", d_steps=1, d_times=10, d_steps_max=4)
    assert [disc.schedule(cfg, 5, dict(d_acc=a))[0] for a in (0.5, 0.7, 0.9)] == [4, 1, 0]
    assert disc.schedule(cfg, 0, dict(d_acc=0.9)) == (1, False)  # warm-up: as configured
    cfg.d_steps_max = 0
    assert disc.schedule(cfg, 5, dict(d_acc=0.5)) == (1, True)


def test_replay_keeps_past_generations_as_extra_fakes():
    disc = DinoDiscriminator(DinoFeatures(tiny_vit(), IMG), replay=2)
    gens = torch.Generator().manual_seed(0)
    batches = [_images([b] * 4) for b in (0.1, 0.2, 0.3)]
    replays = [disc.judge(b, _images([0.9] * 4), [""] * 4, None, [gens] * 4)[2]["replay"] for b in batches]
    assert replays[0] is None and len(disc.pool) == 2                           # the last 2 epochs kept
    first_cls = disc.features(batches[0])[0]
    assert torch.allclose(replays[1][0], first_cls)                             # epoch 1 replays epoch 0
    state = disc.head_state()
    other = DinoDiscriminator(DinoFeatures(tiny_vit(), IMG), replay=2)
    other.load_head_state(state)
    assert all(torch.equal(a, b) for p, q in zip(disc.pool, other.pool) for a, b in zip(p, q))


def test_r1_flattens_the_head_at_the_references():
    def grad_at_refs(r1):
        disc = DinoDiscriminator(DinoFeatures(tiny_vit(), IMG), lr=1e-3, r1=r1)
        fake, real = _images(np.linspace(0.1, 0.5, 8)), _images(np.linspace(0.7, 0.95, 8))
        _judge(disc, fake, real, steps=40)
        cls = disc.features(real)[0].requires_grad_(True)
        (g,) = torch.autograd.grad(disc.head(cls).sum(), cls)
        return g.norm(dim=-1).mean().item()
    assert grad_at_refs(10.0) < 0.5 * grad_at_refs(0.0)


def test_health_in_the_epoch_line_metrics_and_curves(tmp_path):
    out = str(tmp_path / "run")
    log = _run([f"--out_dir={out}", "--epochs=3"])
    assert " signal " in log.split("epoch    3/3")[1].split("\n")[0]
    rows = [r for r in E.read_metrics(os.path.join(out, "metrics.jsonl")) if "d_signal" in r]
    assert len(rows) == 3 and all(-1 <= r["d_signal"] <= 1 and -1 <= r["ref_sim"] <= 1 for r in rows)
    plain = [{k: v for k, v in r.items() if not k.startswith(("d_", "ref_"))} for r in rows]
    for name, rs in (("health", rows), ("plain", plain)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            f.write("\n".join(map(__import__("json").dumps, rs)) + "\n")
        E.plot_curves(str(tmp_path / f"{name}.jsonl"), str(tmp_path / f"{name}.png"))
    # the discriminator's panel makes the figure taller (5.5 → 7.5 inches at 120 dpi)
    assert Image.open(tmp_path / "health.png").height - Image.open(tmp_path / "plain.png").height == 240


def test_resume_is_exact_with_every_health_option_on(tmp_path):
    extra = ["--d_replay=2", "--d_r1=1.0", "--d_steps_max=2", "--adv_signal=True", "--adv_std=False",
             "--g_beta1=0.5"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _run([f"--out_dir={a}", "--epochs=3", *extra])
    _run([f"--out_dir={b}", "--epochs=2", *extra])
    _run([f"--out_dir={b}", "--epochs=3", "--resume"])
    wa, wb = _weights(a, 3), _weights(b, 3)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = (torch.load(os.path.join(d, "checkpoints", "epoch_000003", "state.pt"), weights_only=True)
              for d in (a, b))
    for part in ("head", "pair"):
        assert all(torch.equal(v, sb["adversary"][part][k]) for k, v in sa["adversary"][part].items())
    assert len(sa["adversary"]["pool"]) == 4 and all(
        torch.equal(x, y) for x, y in zip(sa["adversary"]["pool"], sb["adversary"]["pool"]))
    assert sa["counters"] == sb["counters"]


def test_lr_half_life_halves_the_generators_lr_and_resumes_it(tmp_path):
    cfg = types.SimpleNamespace(lr=1e-3, lr_half_life=2, max_grad_norm=1.0, max_bad_updates=5)
    p = torch.nn.Parameter(torch.zeros(3))
    gen = types.SimpleNamespace(params={"p": p}, opt=torch.optim.AdamW([p], lr=1e-3),
                                ema=types.SimpleNamespace(update=lambda *a: None))
    counters, lrs = dict(g_steps=0, bad_updates=0), []
    for _ in range(5):
        p.grad = torch.ones(3)
        T.optimizer_step(cfg, 0, gen, counters)
        lrs.append(gen.opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([1e-3 * 0.5 ** (s / 2) for s in range(5)])
