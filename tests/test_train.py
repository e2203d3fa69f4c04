"""GRPO maths, the real tiny transformer path, config parsing, checkpoints and DDP."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import outputs as O
import data
import model as M
import reward as R
import train as T
from inproc import two_gloo_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET = os.path.join(ROOT, "config", "tiny_random.py")
ADV_PRESET = os.path.join(ROOT, "config", "tiny_random_adv.py")


def tiny_cfg(preset=PRESET, **kw):
    cwd = os.getcwd()
    os.chdir(ROOT)  # presets name repo-relative files
    try:
        cfg = T.parse_args([preset] + [f"--{k}={v!r}" if isinstance(v, str) else f"--{k}={v}"
                                       for k, v in kw.items()])
    finally:
        os.chdir(cwd)
    cfg.train_prompts = os.path.join(ROOT, cfg.train_prompts)
    cfg.references = os.path.join(ROOT, cfg.references)
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
    gen = M.build_generator(cfg, torch.device("cpu"))
    prompts = [p["prompt"] for p in data.load_prompts(cfg.train_prompts)][:2]
    my_prompts = [p for p in prompts for _ in range(cfg.group_size)]
    batch = T.sample_epoch(cfg, 0, gen, my_prompts, list(range(len(my_prompts))), 0)
    return cfg, gen, batch


def test_ratio_is_one_with_unchanged_weights(sampled):
    cfg, gen, batch = sampled
    n = len(batch["images"])
    assert (batch["images"].shape == (n, 3, 32, 32) and 0 <= batch["images"].min()
            and batch["images"].max() <= 1)
    for j in range(cfg.window_size):
        # recompute in training-sized micro-batches, a different grouping than sampling used
        for mb in torch.arange(n).split(cfg.train_batch_size):
            logp, _ = T.step_log_prob(cfg, gen, gen.train_model, batch, mb, j)
            ratio = torch.exp(logp - batch["log_probs"][mb, j])
            assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-6, rtol=0), ratio


def test_optimizer_step_changes_only_lora(sampled):
    cfg, gen, batch = sampled
    before = {k: v.clone() for k, v in gen.transformer.state_dict().items()}
    adv = torch.linspace(-1, 1, len(batch["images"]))
    counters = dict(g_steps=0, bad_updates=0)
    info = T.train_generator(cfg, 0, gen, batch, adv, counters)
    after = gen.transformer.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing trained"
    assert all("lora" in k for k in changed), sorted(changed)[:5]
    # (the last MMDiT block discards its text-stream output, so its add_q_proj gets no gradient)
    assert {k for k in before if "lora_B" in k and "blocks.0." in k} <= changed
    assert counters["g_steps"] == cfg.updates_per_epoch and info["skipped_updates"] == 0


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
    cfg = T.parse_args([PRESET, "--lr=1e-2", "--resume", "--window_start=random",
                        "--reward={'brightness': 2}"])
    assert (cfg.lr == 0.01 and cfg.resume is True and cfg.window_start == "random"
            and cfg.reward == {"brightness": 2})


def test_validate_refuses_bad_batch_arithmetic():
    cfg = tiny_cfg()
    with pytest.raises(SystemExit, match="split evenly over 3 ranks"):
        T.validate(cfg, 3)
    cfg.updates_per_epoch = 3
    with pytest.raises(SystemExit, match="updates_per_epoch"):
        T.validate(cfg, 1)


def test_random_window_is_random_per_epoch_and_in_first_half():
    cfg = tiny_cfg(num_steps=10, window_start="random")
    starts = [T.window_for_epoch(cfg, e) for e in range(80)]
    assert set(starts) == {0, 1, 2, 3, 4, 5}      # 0..N/2 inclusive, as published
    assert starts == [T.window_for_epoch(cfg, e) for e in range(80)]   # same on every rank / resume


# --- checkpoints, resume, DDP -------------------------------------------------------------------

def _run(args, nproc=1, preset=ADV_PRESET):
    if nproc == 1:
        from inproc import run_main
        return run_main("train.py", [preset, *args]).stdout  # no new interpreter for one process
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
           if nproc > 1 else [sys.executable]) + ["train.py", preset] + args
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p.stdout


def _weights(out_dir, epoch):
    from safetensors.torch import load_file
    return load_file(os.path.join(out_dir, "checkpoints", f"epoch_{epoch:06d}", "trainable.safetensors"))


def test_resume_continues_exactly(tmp_path):
    """3 epochs straight == 2 epochs, a new process, --resume, 1 more: generator, EMA and discriminator."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _run([f"--out_dir={a}", "--epochs=3"])
    _run([f"--out_dir={b}", "--epochs=2"])
    out = _run([f"--out_dir={b}", "--epochs=3", "--resume"])
    assert "resumed from" in out and "epoch    3/3" in out  # the epoch line counts epochs done
    wa, wb = _weights(a, 3), _weights(b, 3)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = (torch.load(os.path.join(d, "checkpoints", "epoch_000003", "state.pt"), weights_only=True)
              for d in (a, b))
    for k, v in sa["adversary"]["head"].items():
        assert torch.equal(v, sb["adversary"]["head"][k])
    assert sa["counters"] == sb["counters"]


def _ddp_worker(rank, world, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    # d_conditional: the prompt-aware head's projection must stay in sync too (2 prompts per rank, so each
    # rank has "reference of another prompt" pairs)
    cfg = tiny_cfg(ADV_PRESET, out_dir=out_dir, epochs=3, schedule="shared", d_conditional=True, group_size=2,
                   prompts_per_epoch=4)
    gen, adversary, _ = T.train(cfg)
    state = {k: v.detach().clone() for k, v in gen.params.items()}
    state.update({f"D.{k}": v.detach().clone() for k, v in adversary.head.state_dict().items()})
    state["D.proj"] = adversary.proj.weight.detach().clone()
    torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_process_gloo_keeps_generator_and_discriminator_identical(tmp_path):
    """Each rank generates different images and sees different references, yet after 3 epochs of
    G + D steps both ranks hold bit-identical LoRA and discriminator-head weights."""
    w0, w1 = two_gloo_ranks(_ddp_worker, tmp_path)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    cfg = tiny_cfg(ADV_PRESET)
    init = M.build_generator(cfg, torch.device("cpu")).params
    d_init = R.build_adversary(cfg, torch.device("cpu"))
    assert any(not torch.equal(w0[k], init[k]) for k in init)                         # G trained
    assert any(not torch.equal(w0[f"D.{k}"], v) for k, v in d_init.head.state_dict().items())  # D trained
    assert w0["D.proj"].abs().max() > 0                                                 # its projection too


@pytest.mark.slow  # 45-50 s each (four interpreters start); the DDP maths is in make test through gloo
@pytest.mark.parametrize("extra", [["--schedule=paper", "--d_times=2"],
                                   ["--reward={'pickscore_adv': 1.0}", "--pickscore_model=random:tiny"]],
                         ids=["dino_paper", "pickscore_adv"])
def test_torchrun_two_processes_checkpoint_and_resume(tmp_path, extra):
    out = str(tmp_path / "run")
    _run([f"--out_dir={out}", "--epochs=2"] + extra, nproc=2)
    assert os.path.isdir(os.path.join(out, "checkpoints", "epoch_000002"))
    log = _run([f"--out_dir={out}", "--resume", "--epochs=3"] + extra, nproc=2)
    assert "resumed from" in log and "epoch    3/3" in log


# --- the adversarial reward in the loop -------------------------------------------------------

def test_paper_schedule_counts_d_and_g_separately(tmp_path):
    cfg = tiny_cfg(ADV_PRESET, out_dir=str(tmp_path), schedule="paper", d_times=2, epochs=4)
    c = T.train(cfg)[2]
    # epochs 0 and 2 are D-only, 1 and 3 are G-only
    assert c["d_steps"] == 2 and c["g_epochs"] == 2 and c["g_steps"] == 2 * cfg.updates_per_epoch
    lines = [l for l in open(tmp_path / "metrics.jsonl")]
    assert len(lines) == 4 and all("d_acc" in l and "d_real" in l for l in lines)


def test_shared_schedule_and_pickscore_adversary_run(tmp_path):
    c = T.train(tiny_cfg(ADV_PRESET, out_dir=str(tmp_path / "s"), schedule="shared", d_steps=2, epochs=2))[2]
    assert c["d_steps"] == 4 and c["g_epochs"] == 2
    c = T.train(tiny_cfg(ADV_PRESET, out_dir=str(tmp_path / "p"), epochs=2, reward={"pickscore_adv": 1.0},
                           pickscore_model="random:tiny"))[2]
    assert c["d_steps"] + c["g_epochs"] == 2           # the trigger gives each epoch to exactly one side


def test_training_prompt_without_references_is_refused(tmp_path):
    import json
    idx = json.load(open(os.path.join(ROOT, "assets", "tiny_refs", "index.json")))
    idx.pop("a green triangle on the right")
    (tmp_path / "index.json").write_text(json.dumps(idx))
    cfg = tiny_cfg(ADV_PRESET, references=str(tmp_path / "index.json"),
                   reference_root=os.path.join(ROOT, "assets", "tiny_refs"))
    with pytest.raises(SystemExit, match="1 of 4 training prompts have no reference images.*green triangle"):
        data.load_references(cfg, data.load_prompts(cfg.train_prompts))


def test_default_config_without_weights_points_to_the_demo(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "make demo" in p.stderr


def test_train_defaults_are_the_paper_dino_preset():
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        dino, pick = T.parse_args(["config/sd35m_dino.py"]), T.parse_args(["config/sd35m_pickscore.py"])
    finally:
        os.chdir(cwd)
    defaults = T.parse_args([])
    assert dino == dataclasses.replace(defaults, compile=True)   # compile: on GPUs only, not in the defaults
    assert ((defaults.group_size, defaults.prompts_per_epoch, defaults.clip_range, defaults.d_times)
            == (16, 48, 1e-5, 10))
    assert (defaults.noise_level, defaults.max_sequence_length) == (0.8, 128)
    assert pick.reward == {"pickscore_adv": 1.0} and pick.pickscore_lr == 5e-6


def test_d_warmup_then_frozen_discriminator(tmp_path):
    cfg = tiny_cfg(ADV_PRESET, out_dir=str(tmp_path), schedule="frozen", d_warmup=2, epochs=4)
    c = T.train(cfg)[2]
    assert c["d_steps"] == 2 and c["g_epochs"] == 2      # D only in epochs 0-1, G only in 2-3
    import json
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r["g_epochs"] for r in rows] == [0, 0, 1, 2] and [r["d_steps"] for r in rows] == [1, 2, 2, 2]


def test_external_logger_off_by_default_and_clear_when_missing(monkeypatch):
    assert O.external_logger(tiny_cfg())({"epoch": 0}) is None
    import builtins
    real_import = builtins.__import__

    def no_wandb(name, *a, **k):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(SystemExit, match="pip install wandb"):
        O.external_logger(tiny_cfg(log_to="wandb"))
    with pytest.raises(SystemExit, match="log_to must be"):
        O.external_logger(tiny_cfg(log_to="mlflow"))


def test_low_mem_frees_text_encoders_and_trains_like_the_default(tmp_path):
    """config/sd35m_24gb.py's keys: every prompt encoded at start-up, the text encoders freed, the embedding
    cache on the CPU, VAE decoded 4 at a time, checkpointed activations. The arithmetic is unchanged, so the
    trained weights match the default run's: to 1e-4, because a batch of 4 convolutions is not bitwise one
    of 8 with 2 CPU threads (oneDNN picks per shape; 1.4e-5 seen, on weights of size ~0.9)."""
    a = T.train(tiny_cfg(out_dir=str(tmp_path / "a"), sample_batch_size=8))[0]
    b = T.train(tiny_cfg(out_dir=str(tmp_path / "b"), sample_batch_size=8, low_mem=True,
                         gradient_checkpointing=True))[0]
    assert a.pipe.text_encoder is not None
    assert b.pipe.text_encoder is None and b.pipe.text_encoder_2 is None
    every = {"", *(p["prompt"] for p in data.load_prompts(tiny_cfg().train_prompts))}
    assert set(b.encode.cache) == every and set(a.encode.cache) <= every
    assert all(e.device.type == "cpu" for e, _ in b.encode.cache.values())
    wa, wb = _weights(str(tmp_path / "a"), 2), _weights(str(tmp_path / "b"), 2)
    assert wa.keys() == wb.keys()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-4, rtol=0) for k in wa)
    with pytest.raises(RuntimeError, match="low_mem"):
        b.encode(["a prompt that was never encoded"])


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs CUDA (bf16 and cuBLAS kernels chosen per batch shape)")
@pytest.mark.parametrize("compile", [False, True])
def test_ratio_is_one_on_cuda_bf16_at_sd35m_size(compile):
    """On a GPU at SD3.5-M shapes (random weights, no T5), bf16 autocast, sampled in batches of 16, trained in
    micro-batches of 8, grad on, eager and compiled: with lr = 0 every pass is a first recompute, so every
    ratio must be exactly 1 (clipfrac 0 at ε = 1e-6). Also prints how far the sampler's own log-probs were."""
    torch.manual_seed(0)
    cfg = tiny_cfg(pretrained="random:sd3.5-medium", resolution=512, max_sequence_length=128,
                   mixed_precision="bf16",
                   num_steps=10, guidance_scale=4.5, group_size=16, sample_batch_size=16, train_batch_size=8,
                   updates_per_epoch=2, clip_range=1e-6, compile=compile)
    gen = M.build_generator(cfg, torch.device("cuda"))
    for g in gen.opt.param_groups:
        g["lr"] = 0.0
    prompts = [p["prompt"] for p in data.load_prompts(cfg.train_prompts)][:1] * cfg.group_size
    batch = T.sample_epoch(cfg, 0, gen, prompts, list(range(len(prompts))), 0)
    info = T.train_generator(cfg, 0, gen, batch, torch.linspace(-1, 1, len(prompts), device="cuda"),
                             dict(g_steps=0, bad_updates=0))
    print(f"compile={compile}: sampler vs training max |log ratio| {info['sampler_logp_gap']:.2e}")
    assert info["clipfrac"] == 0 and info["approx_kl"] == 0, info


def test_external_logger_calls_wandb_as_documented(monkeypatch, tmp_path):
    """wandb is not a dependency, so a stand-in module records the calls: one run named after out_dir
    with the whole config, and each epoch's stats logged at step = epoch."""
    import types
    calls = []
    run = types.SimpleNamespace(log=lambda stats, step: calls.append(("log", dict(stats), step)))
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or run)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = tiny_cfg(log_to="wandb", out_dir=str(tmp_path / "run_a"))
    log = O.external_logger(cfg)
    log({"epoch": 3, "reward_mean": 0.5})
    assert calls[0][0] == "init" and calls[0][1]["name"] == "run_a" and calls[0][1]["config"]["lr"] == cfg.lr
    assert calls[1] == ("log", {"epoch": 3, "reward_mean": 0.5}, 3)


def test_external_logger_writes_tensorboard_scalars(tmp_path):
    """Runs where tensorboard is installed (not a requirement; skipped otherwise): scalars read back."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = tiny_cfg(log_to="tensorboard", out_dir=str(tmp_path))
    log = O.external_logger(cfg)
    log({"epoch": 0, "reward_mean": 0.25, "note": "text is skipped"})
    log({"epoch": 1, "reward_mean": 0.75, "g_steps": 2})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("reward_mean")] == [(0, 0.25), (1, 0.75)]
    assert [(e.step, e.value) for e in acc.Scalars("g_steps")] == [(1, 2.0)]
    assert "note" not in acc.Tags()["scalars"]


def test_missing_held_out_prompts_refused_before_the_model_loads(tmp_path):
    """check_inputs runs before the model load: a wrong test_prompts path costs seconds, not a model load."""
    cfg = tiny_cfg(eval_every=5, test_prompts=str(tmp_path / "nope.txt"))
    with pytest.raises(SystemExit, match="held-out prompts .*nope.txt"):
        T.check_inputs(cfg, 1)
    prompts, test_prompts, refs, resume = T.check_inputs(tiny_cfg(eval_every=0, test_prompts="nope.txt"), 1)
    assert len(prompts) == 4 and test_prompts == [] and refs is None and resume == (None, None)


@pytest.mark.slow  # two processes compile the tiny transformer: ~1 min cold
def test_compiled_ddp_matches_eager_ddp(tmp_path):
    """torch.compile around DDP (with no_sync accumulation) trains the same weights as eager DDP."""
    c, e = str(tmp_path / "c"), str(tmp_path / "e")
    _run([f"--out_dir={c}", "--epochs=3", "--compile=True"], nproc=2)
    _run([f"--out_dir={e}", "--epochs=3"], nproc=2)
    wc, we = _weights(c, 3), _weights(e, 3)
    assert wc.keys() == we.keys()
    assert all(torch.allclose(wc[k], we[k], atol=1e-5, rtol=0) for k in wc)


def test_first_recompute_is_exact_under_bf16_and_compile():
    """The recipe runs bf16 + torch.compile: sampling goes through an inference graph, the update through
    a training graph, and the two round differently (measured here: |log ratio| ~ 2e-4 at unchanged
    weights, far outside ε = 1e-5). train.py therefore takes the old log-probs from the training graph
    itself. With lr = 0 every pass of the epoch is a "first recompute": every ratio must be exactly 1."""
    torch.manual_seed(0)
    cfg = tiny_cfg(mixed_precision="bf16", compile=True, clip_range=1e-6, updates_per_epoch=2)
    gen = M.build_generator(cfg, torch.device("cpu"))
    for g in gen.opt.param_groups:
        g["lr"] = 0.0
    prompts = [p["prompt"] for p in data.load_prompts(cfg.train_prompts)][:2]
    prompts = [p for p in prompts for _ in range(cfg.group_size)]
    batch = T.sample_epoch(cfg, 0, gen, prompts, list(range(len(prompts))), 0)
    info = T.train_generator(cfg, 0, gen, batch, torch.linspace(-1, 1, len(prompts)),
                             dict(g_steps=0, bad_updates=0))
    assert info["clipfrac"] == 0 and info["approx_kl"] == 0 and info["ratio"] == 1, info
    # the sampler's own log-probs differ by rounding: had they been the old log-probs, every pass would clip
    assert info["sampler_logp_gap"] > cfg.clip_range, info


def test_lora_targets_the_published_layers_of_sd35_medium():
    """The joint attention only, not the image-only attn2 of the 13 dual-attention blocks: 191 adapted
    Linears and 18.78 M parameters at rank 32, as the published recipe (shape-only model, no weights)."""
    from diffusers import SD3Transformer2DModel
    import model as M
    with torch.device("meta"):
        tr = SD3Transformer2DModel(**M.ARCHS["sd3.5-medium"]["transformer"])
    M.add_lora(tr, 32, 64)
    adapted = [n for n, m in tr.named_modules() if hasattr(m, "lora_A")]
    assert len(adapted) == 191 and not any(".attn2." in n for n in adapted)
    assert sum(p.numel() for p in M.trainable_parameters(tr).values()) == 18_776_064


def test_ema_warm_up_follows_the_published_formula():
    """decay(s) = min((1+s)/(10+s), 0.9) at optimizer step s, one update every 8 steps: after 80 steps the
    EMA has absorbed 92 % of a weight change made at step 0 (65 % with a constant 0.9)."""
    import model as M
    p = {"w": torch.zeros(1)}
    ema = M.EMA(p, decay=0.9, every=8)
    p["w"] += 1.0
    for s in range(1, 81):
        ema.update(p, s)
    expect = 1 - np.prod([min((1 + s) / (10 + s), 0.9) for s in range(8, 81, 8)])
    assert abs(ema.shadow["w"].item() - expect) < 1e-6 and 0.91 < expect < 0.93
    assert ema.decay_at(1) == 2 / 11 and ema.decay_at(1000) == 0.9


def test_sde_kind_sets_noise_level_and_clip_range_unless_given():
    cps, sde = T.parse_args([]), T.parse_args(["--sde_kind=sde"])
    assert ((cps.noise_level, cps.clip_range) == (0.8, 1e-5)
            and (sde.noise_level, sde.clip_range) == (0.7, 1e-4))
    own = T.parse_args(["--sde_kind=sde", "--noise_level=0.5", "--clip_range=2e-4"])
    assert (own.noise_level, own.clip_range) == (0.5, 2e-4)


@pytest.mark.parametrize("args, msg", [
    (["--sde_kind=ode"], "sde_kind must be 'cps' or 'sde'"),
    (["--window_start=9"], "fits in num_steps = 10"),
    (["--window_size=0"], "window_size must be in 1..num_steps"),
    (["--window_size=11"], "window_size must be in 1..num_steps"),
])
def test_untrainable_step_kind_and_window_refused_before_the_model_loads(args, msg):
    with pytest.raises(SystemExit, match=msg):
        T.validate(T.parse_args(args), 1)


def test_tiny_pipeline_settings_fill_the_text_length_and_refuse_a_contradiction():
    cfg = T.parse_args([f"--pretrained={os.path.join(ROOT, 'assets', 'tinyworld', 'pipeline')}",
                        "--resolution=32"])
    assert cfg.max_sequence_length == 1 and T.parse_args([]).max_sequence_length == 128
    with pytest.raises(SystemExit, match="trained with max_sequence_length = 1"):
        T.parse_args([f"--pretrained={os.path.join(ROOT, 'assets', 'tinyworld', 'pipeline')}",
                      "--resolution=32", "--max_sequence_length=77"])
    with pytest.raises(SystemExit, match="trained with resolution = 32"):
        T.parse_args([f"--pretrained={os.path.join(ROOT, 'assets', 'tinyworld', 'pipeline')}"])


def _readme_reward_example():
    """The ```python block of README's "Extend" section, as a user would copy it."""
    text = open(os.path.join(ROOT, "README.md")).read()
    return text[text.index("## Extend"):].split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_reward_example_runs_as_written(tmp_path):
    """The README's rule_sim wraps dino_sim: it names references and φ, so the run loads them although no
    adversary is chosen, and its setting lam comes from --reward. A stand-in rule scores 1."""
    ns = dict(register=R.register, REWARDS=R.REWARDS, torch=torch, my_rule=lambda image, prompt: 1.0)
    exec(_readme_reward_example(), ns)
    try:
        from inproc import run_main
        run_main("train.py", [PRESET, "--reward={'rule_sim': {'weight': 1.0, 'lam': 0.3}}",
                              f"--references={os.path.join(ROOT, 'assets', 'tiny_refs', 'index.json')}",
                              "--dino_backbone=random:tiny", "--dino_image_size=28", "--epochs=1",
                              "--eval_every=1", "--eval_num_steps=2", f"--out_dir={tmp_path}"])
        first = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")][0]
        assert "eval/dino_sim" in first              # the φ it named measures the held-out set too
        cfg = tiny_cfg(ADV_PRESET, reward={"rule_sim": {"weight": 1.0, "lam": 1.0}})
        refs = data.load_references(cfg, data.load_prompts(cfg.train_prompts))
        images, prompts = torch.rand(2, 3, 32, 32), ["a red circle on the left"] * 2
        r, info = R.build_fixed_reward(cfg, torch.device("cpu"), refs)(images, prompts, [{}] * 2)
        assert r.tolist() == [1.0, 1.0] and info["reward/rule_sim"] == 1.0   # lam = 1: the rule alone
        with pytest.raises(SystemExit, match="reward 'rule_sim' has no setting 'lamb' .*its settings: lam"):
            T.check_inputs(tiny_cfg(reward={"rule_sim": {"weight": 1.0, "lamb": 0.3}}), 1)
    finally:
        R.REWARDS.pop("rule_sim", None)
