"""GRPO maths, the real tiny transformer path, config parsing, checkpoints and DDP."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import train as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET = os.path.join(ROOT, "config", "tiny_random.py")


def tiny_cfg(**kw):
    cfg = T.parse_args([PRESET] + [f"--{k}={v!r}" if isinstance(v, str) else f"--{k}={v}" for k, v in kw.items()])
    cfg.train_prompts = os.path.join(ROOT, cfg.train_prompts)
    return cfg


# --- advantages and loss ---------------------------------------------------------------------

def test_advantages_zero_mean_unit_std_per_group():
    rng = np.random.default_rng(0)
    r = rng.normal(size=12) * np.repeat([1.0, 5.0, 0.1], 4) + np.repeat([0.0, 10.0, -3.0], 4)
    groups = ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    adv = T.compute_advantages(r, groups)
    for g in range(3):
        a = adv[4 * g:4 * g + 4]
        assert abs(a.mean()) < 1e-9
        s = r[4 * g:4 * g + 4].std()
        assert abs(a.std() - s / (s + 1e-4)) < 1e-9   # unit std up to the 1e-4 guard
    # torch in, torch out; global_std divides every group by the same std
    adv_t = T.compute_advantages(torch.tensor(r, dtype=torch.float32), groups, global_std=True)
    assert torch.is_tensor(adv_t) and adv_t.dtype == torch.float32
    expect = (r - np.repeat([r[i:i + 4].mean() for i in (0, 4, 8)], 4)) / (r.std() + 1e-4)
    np.testing.assert_allclose(adv_t.numpy(), expect, rtol=1e-4, atol=1e-6)
    # a group with identical rewards gets zero advantages, not NaN
    assert np.all(T.compute_advantages(np.ones(4), [0] * 4) == 0)


def test_loss_is_minus_mean_clipped_advantage_at_ratio_one():
    lp = torch.randn(16)
    adv = torch.randn(16) * 10
    loss, info = T.grpo_loss(lp, lp.clone(), adv, clip_range=1e-4, adv_clip=5.0)
    assert torch.isclose(loss, -adv.clamp(-5, 5).mean())
    assert info["clipfrac"] == 0 and info["approx_kl"] == 0


def test_loss_clips_ratio_in_the_pessimistic_direction():
    old = torch.zeros(2)
    lp = torch.tensor([0.5, 0.5])            # ratio e^0.5 ≈ 1.65, far outside 1 ± 0.1
    adv = torch.tensor([1.0, -1.0])
    loss, info = T.grpo_loss(lp, old, adv, clip_range=0.1, adv_clip=5.0)
    # A > 0: gain capped at 1.1; A < 0: the unclipped (worse) ratio counts
    assert torch.isclose(loss, (torch.tensor(-1.1) + torch.tensor(0.5).exp()) / 2)
    assert info["clipfrac"] == 1.0


# --- the real transformer path ----------------------------------------------------------------

@pytest.fixture(scope="module")
def sampled():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    ctx = T.build(cfg, torch.device("cpu"), 0, 1)
    prompts = [p["prompt"] for p in data.load_prompts(cfg.train_prompts)][:2]
    my_prompts = [p for p in prompts for _ in range(cfg.group_size)]
    batch = T.sample_epoch(cfg, 0, ctx, my_prompts, list(range(len(my_prompts))), 0)
    return cfg, ctx, batch


def test_ratio_is_one_with_unchanged_weights(sampled):
    cfg, ctx, batch = sampled
    n = len(batch["images"])
    assert batch["images"].shape == (n, 3, 32, 32) and 0 <= batch["images"].min() and batch["images"].max() <= 1
    for j in range(cfg.window_size):
        # recompute in training-sized micro-batches, a different grouping than sampling used
        for mb in torch.arange(n).split(cfg.train_batch_size):
            logp, _ = T.step_log_prob(cfg, ctx, ctx["ddp_model"], batch, mb, j)
            ratio = torch.exp(logp - batch["log_probs"][mb, j])
            assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-6, rtol=0), ratio


def test_optimizer_step_changes_only_lora(sampled):
    cfg, ctx, batch = sampled
    before = {k: v.clone() for k, v in ctx["transformer"].state_dict().items()}
    adv = torch.linspace(-1, 1, len(batch["images"]))
    info = T.train_generator(cfg, 0, ctx, batch, adv)
    after = ctx["transformer"].state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing trained"
    assert all("lora" in k for k in changed), sorted(changed)[:5]
    # (the last MMDiT block discards its text-stream output, so its add_q_proj gets no gradient)
    assert {k for k in before if "lora_B" in k and "blocks.0." in k} <= changed
    assert ctx["counters"]["g_steps"] == cfg.updates_per_epoch and info["skipped_updates"] == 0


# --- config -------------------------------------------------------------------------------------

def test_parser_refuses_unknown_key_and_wrong_type(tmp_path):
    with pytest.raises(SystemExit, match="unknown config key 'clip_rang'.*did you mean 'clip_range'"):
        T.parse_args(["--clip_rang=1e-4"])
    with pytest.raises(SystemExit, match="group_size must be int"):
        T.parse_args(["--group_size=abc"])
    bad = tmp_path / "bad.py"
    bad.write_text("num_stepz = 3\n")
    with pytest.raises(SystemExit, match="bad.py: unknown config key 'num_stepz'"):
        T.parse_args([str(bad)])
    cfg = T.parse_args([PRESET, "--lr=1e-2", "--resume", "--window_start=random", "--reward={'brightness': 2}"])
    assert cfg.lr == 0.01 and cfg.resume is True and cfg.window_start == "random" and cfg.reward == {"brightness": 2}


def test_validate_refuses_bad_batch_arithmetic():
    cfg = tiny_cfg()
    with pytest.raises(SystemExit, match="split evenly over 3 ranks"):
        T.validate(cfg, 3)
    cfg.updates_per_epoch = 3
    with pytest.raises(SystemExit, match="updates_per_epoch"):
        T.validate(cfg, 1)


def test_random_window_is_random_per_epoch_and_in_first_half():
    cfg = tiny_cfg(num_steps=10, window_start="random")
    starts = [T.window_for_epoch(cfg, e) for e in range(50)]
    assert set(starts) == {0, 1, 2, 3, 4}
    assert starts == [T.window_for_epoch(cfg, e) for e in range(50)]   # same on every rank / resume


# --- checkpoints, resume, DDP -------------------------------------------------------------------

def _run(args, nproc=1):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
           if nproc > 1 else [sys.executable]) + ["train.py", PRESET] + args
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p.stdout


def _weights(out_dir, epoch):
    from safetensors.torch import load_file
    return load_file(os.path.join(out_dir, "checkpoints", f"epoch_{epoch:06d}", "trainable.safetensors"))


def test_resume_continues_exactly(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _run([f"--out_dir={a}", "--epochs=3"])
    _run([f"--out_dir={b}", "--epochs=2"])
    out = _run([f"--out_dir={b}", "--epochs=3", "--resume"])
    assert "resumed from" in out and "epoch    2" in out
    wa, wb = _weights(a, 2), _weights(b, 2)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _ddp_worker(rank, world, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    cfg = tiny_cfg(out_dir=out_dir, epochs=2)
    ctx = T.train(cfg)
    torch.save({k: v.detach().clone() for k, v in ctx["params"].items()}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_process_gloo_keeps_ranks_identical(tmp_path):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    w0, w1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    init = T.build(tiny_cfg(), torch.device("cpu"), 0, 1)["params"]
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert any(not torch.equal(w0[k], init[k]) for k in w0)           # and they did train


def test_torchrun_two_processes_checkpoint_and_resume(tmp_path):
    out = str(tmp_path / "run")
    _run([f"--out_dir={out}"], nproc=2)
    assert os.path.isdir(os.path.join(out, "checkpoints", "epoch_000001"))
    log = _run([f"--out_dir={out}", "--resume", "--epochs=3"], nproc=2)
    assert "resumed from" in log and "epoch    2" in log
