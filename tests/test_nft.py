"""DiffusionNFT (objective = "nft"): the loss's maths, the old model, and the loop end to end."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import checkpoint as C
import model as M
import nft
import train as T
from inproc import run_main, two_gloo_ranks
from test_train import ADV_PRESET, PRESET, tiny_cfg

SHAPE = (3, 4, 5, 5)  # (B, C, h, w)


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, eps, v_old, v_theta = (torch.randn(SHAPE, generator=g) for _ in range(4))
    return x0, eps, v_old, v_theta, torch.rand(SHAPE[0], generator=g) * 0.9 + 0.05


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_half_optimality_is_flow_matching_of_v_old_plus_beta_squared_pull(beta):
    """r ≡ ½: L = ‖v_old - v‖² + β²‖v_θ - v_old‖², so the gradient is zero at v_θ = v_old (no preference,
    no change), with and without the adaptive weighting."""
    x0, eps, v_old, v_theta, t = _case()
    v = eps - x0
    half = torch.full((SHAPE[0],), 0.5)
    loss = nft.nft_loss(v_theta, v_old, x0, eps, t, half, beta, adaptive=False)
    want = ((v_old - v) ** 2).mean((1, 2, 3)) + beta ** 2 * ((v_theta - v_old) ** 2).mean((1, 2, 3))
    torch.testing.assert_close(loss, want)
    for adaptive in (False, True):
        at_old = v_old.clone().requires_grad_(True)
        nft.nft_loss(at_old, v_old, x0, eps, t, half, beta, adaptive).sum().backward()
        assert at_old.grad.abs().max() < 1e-6, adaptive


def test_full_optimality_is_flow_matching_of_the_positive_velocity():
    x0, eps, v_old, v_theta, t = _case(1)
    ones = torch.ones(SHAPE[0])
    v_pos = (1 - 0.3) * v_old + 0.3 * v_theta
    torch.testing.assert_close(nft.nft_loss(v_theta, v_old, x0, eps, t, ones, 0.3, adaptive=False),
                               ((v_pos - (eps - x0)) ** 2).mean((1, 2, 3)))
    # adaptive: the same error in x0 space, x̂0 - x0 = t·(v - v⁺), over its own mean |error|
    err = t.view(-1, 1, 1, 1) * ((eps - x0) - v_pos)
    torch.testing.assert_close(nft.nft_loss(v_theta, v_old, x0, eps, t, ones, 0.3),
                               (err ** 2).mean((1, 2, 3)) / err.abs().mean((1, 2, 3)), rtol=1e-5, atol=1e-6)
    # r ≡ 0 is the mirror image: flow matching of v⁻ = (1+β)·v_old - β·v_θ
    v_neg = 1.3 * v_old - 0.3 * v_theta
    torch.testing.assert_close(nft.nft_loss(v_theta, v_old, x0, eps, t, 0 * ones, 0.3, adaptive=False),
                               ((v_neg - (eps - x0)) ** 2).mean((1, 2, 3)))


@pytest.mark.parametrize("adaptive", [False, True])
def test_gradient_pulls_toward_positives_and_pushes_away_from_negatives(adaptive):
    """Two images at the same x_t-independent v_old: one positive (r = 1), one negative (r = 0). A small
    gradient step from v_θ = v_old moves v_θ toward the positive's target v and away from the negative's."""
    x0, eps, v_old, _, t = _case(2)
    x0, eps, v_old, t = x0[:2], eps[:2], v_old[:2], t[:2]
    target = eps - x0
    r = torch.tensor([1.0, 0.0])
    v_theta = v_old.clone().requires_grad_(True)
    nft.nft_loss(v_theta, v_old, x0, eps, t, r, 1.0, adaptive).sum().backward()
    stepped = v_old - 1e-2 * v_theta.grad
    dist = lambda a: ((a - target) ** 2).sum((1, 2, 3))
    before, after = dist(v_old), dist(stepped)
    assert after[0] < before[0]   # the positive's target: closer
    assert after[1] > before[1]   # the negative's: farther


def test_optimality_from_advantages():
    a = torch.tensor([-20.0, -5.0, -2.5, 0.0, 2.5, 5.0, 20.0])
    torch.testing.assert_close(nft.optimality(a, 5.0), torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]))


def test_old_model_soft_update_and_schedule():
    assert [nft.eta_at(s, 0.001, 0.5) for s in (0, 1, 100, 500, 10 ** 6)] == [0, 0.001, 0.1, 0.5, 0.5]
    p = {"w": torch.randn(5), "b": torch.randn(3)}
    old = M.Shadow(p)  # θ_old: a shadow of the trainable tensors, as the EMA
    start = {k: v.clone() for k, v in old.shadow.items()}
    new = {k: v + 1.0 for k, v in p.items()}
    old.follow(new, 0.3)
    for k in p:  # θ_old = η·θ_old + (1-η)·θ
        torch.testing.assert_close(old.shadow[k], 0.3 * start[k] + 0.7 * new[k])
    old.follow(new, 0.0)  # η = 0: the old model is the current one
    assert all(torch.equal(old.shadow[k], new[k]) for k in p)
    # applied(): swapped in and back exactly
    q = {k: torch.nn.Parameter(v.clone()) for k, v in p.items()}
    with old.applied(q):
        assert all(torch.equal(q[k], new[k]) for k in p)
    assert all(torch.equal(q[k], p[k]) for k in p) and all(torch.equal(old.shadow[k], new[k]) for k in p)


def test_one_update_trains_the_lora_and_the_old_model_is_the_eta_mix():
    """A real tiny generator: after one nft update the old model (only a shadow of the LoRA tensors) differs
    from θ and equals η·θ_before + (1-η)·θ_after; swapped in, it is what the transformer computes with."""
    cfg = tiny_cfg(objective="nft", nft_eta_rate=0.2, updates_per_epoch=1)
    gen = M.build_generator(cfg, torch.device("cpu"))
    assert set(gen.old.shadow) == set(gen.params) and all("lora" in k for k in gen.params)
    before = {k: p.detach().clone() for k, p in gen.params.items()}
    prompts = ["a red cube"] * 4 + ["a blue ball"] * 4
    batch = T.sample_epoch(cfg, 0, gen, prompts, range(8), 0, progress=False)
    assert batch["latents"].shape == (8, *gen.latent_shape()) and batch["log_probs"].shape == (8, 0)
    adv = torch.tensor([3.0, -3.0, 1.0, -1.0] * 2)
    counters = dict(g_steps=0, bad_updates=0)
    info = T.train_generator(cfg, 0, gen, batch, adv, counters, progress=False)
    assert counters["g_steps"] == 1 and info["nft_eta"] == pytest.approx(0.2) and info["skipped_updates"] == 0
    after = {k: p.detach().clone() for k, p in gen.params.items()}
    assert any(not torch.equal(before[k], after[k]) for k in after)            # θ moved
    assert any(not torch.equal(gen.old.shadow[k], after[k]) for k in after)    # θ_old ≠ θ
    for k in after:
        torch.testing.assert_close(gen.old.shadow[k], 0.2 * before[k] + 0.8 * after[k])
    x, t = batch["latents"][:2], gen.sigmas[3].expand(2)
    with torch.no_grad():
        with gen.old.applied(gen.params):
            v_old = nft.velocity(gen.transformer, gen, batch, torch.arange(2), x, t)
        for k, p in gen.params.items():
            p.copy_(gen.old.shadow[k])
        v_ref = nft.velocity(gen.transformer, gen, batch, torch.arange(2), x, t)
    torch.testing.assert_close(v_old, v_ref, rtol=0, atol=0)


def test_bad_values_refused_in_one_line(tmp_path):
    for args, msg in ((["--nft_beta=0"], "nft_beta must be > 0"),
                      (["--nft_eta_max=1.0"], "nft_eta_max must be in [0, 1)"),
                      (["--nft_eta_max=-0.1"], "nft_eta_max must be in [0, 1)"),
                      (["--nft_t_fraction=0"], "nft_t_fraction must be in (0, 1]"),
                      (["--window_start=random"], "window_start must be left at '0' with objective = 'nft'"),
                      (["--sde_kind=sde"], "sde_kind must be left at 'cps' with objective = 'nft'"),
                      (["--objective=ppo"], "objective must be 'grpo' or 'nft'")):
        obj = [] if "--objective=ppo" in args else ["--objective=nft"]
        p = run_main("train.py", [PRESET, *obj, *args, f"--out_dir={tmp_path}/x"], ok=False)
        assert msg in p.stderr and len(p.stderr.strip().splitlines()) == 1, (args, p.stderr)


def _weights(out, epoch, name):
    return load_file(os.path.join(out, "checkpoints", f"epoch_{epoch:06d}", name))


def test_resume_is_exact_and_checkpoints_hold_the_old_model(tmp_path):
    """3 epochs straight == 2, then --resume 1 more: θ, EMA and the old model, bitwise (adversarial reward,
    so the discriminator path runs unchanged beside nft)."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    args = [ADV_PRESET, "--objective=nft", "--save_every=1"]
    run_main("train.py", [*args, f"--out_dir={a}", "--epochs=3"])
    run_main("train.py", [*args, f"--out_dir={b}", "--epochs=2"])
    out = run_main("train.py", [*args, f"--out_dir={b}", "--epochs=3", "--resume"]).stdout
    assert "resumed from" in out
    for name in ("trainable.safetensors", "ema.safetensors", "old.safetensors"):
        wa, wb = _weights(a, 3, name), _weights(b, 3, name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    old, now = _weights(a, 3, "old.safetensors"), _weights(a, 3, "trainable.safetensors")
    assert old.keys() == now.keys() and any(not torch.equal(old[k], now[k]) for k in old)
    # another objective on --resume is another experiment
    p = run_main("train.py", [ADV_PRESET, f"--out_dir={b}", "--epochs=4", "--resume", "--objective=grpo"],
                 ok=False)
    assert "objective" in p.stderr
    # an nft checkpoint without its old model (removed, the manifest re-hashed) is damaged, not θ_old = θ
    ck = os.path.join(a, "checkpoints", "epoch_000003")
    os.remove(os.path.join(ck, "old.safetensors"))
    manifest = json.load(open(os.path.join(ck, C.MANIFEST)))
    with open(os.path.join(ck, C.MANIFEST), "w") as f:
        json.dump({n: v for n, v in manifest.items() if n != "old.safetensors"}, f)
    assert C.damaged(ck) == "old.safetensors is missing (an nft run's old model)"


def _ddp_worker(rank, world, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    cfg = tiny_cfg(ADV_PRESET, out_dir=out_dir, epochs=2, schedule="shared", group_size=2,
                   prompts_per_epoch=4, objective="nft")
    gen, _, _ = T.train(cfg)
    state = {k: v.detach().clone() for k, v in gen.params.items()}
    state.update({f"old.{k}": v.clone() for k, v in gen.old.shadow.items()})
    torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_process_gloo_keeps_theta_and_the_old_model_identical(tmp_path):
    w0, w1 = two_gloo_ranks(_ddp_worker, tmp_path)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    init = M.build_generator(tiny_cfg(ADV_PRESET), torch.device("cpu")).params
    assert any(not torch.equal(w0[k], init[k]) for k in init)                       # θ trained


def test_tiny_world_nft_trains_and_evaluates(tmp_path):
    """The committed shapes world, as a user runs it: 2 epochs of nft, evaluated before and after."""
    out = str(tmp_path / "run")
    p = run_main("train.py", ["config/tiny.py", "--objective=nft", "--epochs=2", "--d_warmup=0",
                              "--prompts_per_epoch=2", "--eval_every=2", "--eval_max_prompts=2",
                              "--eval_n_per_prompt=1", f"--out_dir={out}", "--save_every=2"])
    assert "epoch    1/2" in p.stdout
    import json
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    evals = [r for r in rows if any(k.startswith("eval") or "geneval" in k for k in r)]
    assert [r["epoch"] for r in evals] == [0, 2], rows
    assert rows[1]["g_steps"] >= 1 and "nft_eta" in rows[1]


def test_sigkill_mid_run_then_resume_is_bitwise_identical(tmp_path):
    """kill -9 between checkpoints, --resume: θ, EMA and the old model end bitwise where a straight run
    ends."""
    import signal
    import subprocess
    import sys
    import time
    from test_train import ROOT
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    args = [ADV_PRESET, "--objective=nft", "--epochs=8", "--save_every=2"]
    run_main("train.py", [*args, f"--out_dir={a}"])
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "train.py", *args, f"--out_dir={b}"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, t0 = os.path.join(b, "metrics.jsonl"), time.time()
    while not (os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 5):  # inside epoch 5 or 6
        assert proc.poll() is None and time.time() - t0 < 120
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert sorted(os.listdir(os.path.join(b, "checkpoints")))[-1] in ("epoch_000004", "epoch_000006")
    assert "resumed from" in run_main("train.py", [*args, f"--out_dir={b}", "--resume"]).stdout
    for name in ("trainable.safetensors", "ema.safetensors", "old.safetensors"):
        wa, wb = _weights(a, 8, name), _weights(b, 8, name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name


def test_nft_samples_cfg_free_whatever_grpo_guidance_says(tmp_path, monkeypatch):
    """The loss trains the conditional velocity, so its samples are drawn without CFG (nft_guidance_scale,
    published 1): guidance_scale (GRPO's, 3 in the shapes world) must not reach NFT's rollouts."""
    import sampler as S
    seen, make = [], S.make_velocity_fn
    monkeypatch.setattr(S, "make_velocity_fn", lambda *a, **k: seen.append(a[5] if len(a) > 5 else 1.0)
                        or make(*a, **k))
    run_main("train.py", [PRESET, "--objective=nft", "--guidance_scale=3.0", "--epochs=1", "--eval_every=0",
                          f"--out_dir={tmp_path / 'run'}"])
    assert seen and set(seen) == {1.0}, seen
    seen.clear()
    run_main("train.py", [PRESET, "--objective=nft", "--nft_guidance_scale=2.0", "--epochs=1",
                          "--eval_every=0", f"--out_dir={tmp_path / 'run2'}"])
    assert 2.0 in seen
