"""The CPU scale rehearsal: the SD3.5-M recipe presets at the real architectures with random weights —
24 joint blocks (13 dual-attention), CLIP-L + CLIP-G, DINOv2-B/14 at 518² (1,369 patch tokens), the
PickScore adversary's CLIP-H, LoRA r32 on the 191 joint-attention Linears, CFG 4.5, the CPS window, bf16,
low_mem — with only the batch shrunk (1 prompt × 2 images, 64², 3 sampling steps) and compile off (a CPU).
Each preset runs 2 epochs straight, then again killed (-9) inside its second epoch and resumed: the
checkpoints must be bitwise equal; the exported LoRA must load in plain diffusers.

    python -m pytest -m scale -s            # ~35 min on 2 shared cores, 12 GB of memory at its peak

Not in `make test` (marked `scale`). docs/PERF.md has what it measured."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.scale
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHRUNK = ["--pretrained=random:sd3.5-medium", "--t5=False", "--resolution=64", "--num_steps=3",
          "--prompts_per_epoch=1", "--group_size=2", "--sample_batch_size=2", "--train_batch_size=2",
          "--updates_per_epoch=1", "--compile=False", "--low_mem=True", "--gradient_checkpointing=True",
          "--train_prompts=assets/tiny_prompts.txt", "--references=assets/tiny_refs/index.json",
          "--eval_every=0", "--epochs=2", "--save_every=1", "--d_times=2"]  # the paper schedule: D, then G
DINO = ["--dino_backbone=random:vit_base_patch14_dinov2"]                  # DINOv2-B/14's architecture, 518²
PRESETS = {
    "grpo": ["config/sd35m_dino.py", *DINO],
    "nft": ["config/sd35m_dino_nft.py", *DINO],
    "pickscore": ["config/sd35m_pickscore.py", "--pickscore_model=random:vit-h-14"],
}


def _train(args, out, kill_after=None):
    """train.py in its own process; kill_after: a line to wait for, then kill -9 a few seconds later.
    Returns (stdout, peak resident memory in GiB)."""
    cmd = [sys.executable, "train.py", *args, f"--out_dir={out}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if kill_after and kill_after in line:  # the epoch's checkpoint is being written: wait for it
            while not os.path.isdir(os.path.join(out, "checkpoints", "epoch_000001")):
                time.sleep(1)
            time.sleep(15)  # inside the next epoch
            p.send_signal(signal.SIGKILL)
            break
    p.wait()
    log = "".join(lines)
    if not kill_after:
        assert p.returncode == 0, log[-4000:]
    return log


@pytest.mark.parametrize("kind", list(PRESETS))
def test_the_recipe_runs_and_resumes_bitwise_at_sd35m_shapes(tmp_path, kind):
    args = [*PRESETS[kind], *SHRUNK]
    t0 = time.time()
    straight = _train(args, tmp_path / "a")
    minutes = (time.time() - t0) / 60
    _train(args, tmp_path / "b", kill_after="epoch    1/2")
    assert not os.path.isdir(tmp_path / "b" / "checkpoints" / "epoch_000002")  # killed before its end
    resumed = _train([*args, "--resume"], tmp_path / "b")
    assert "resumed from" in resumed and "epoch    2/2" in resumed
    for name in ("trainable.safetensors", "ema.safetensors"):
        a, b = (load_file(tmp_path / d / "checkpoints" / "epoch_000002" / name) for d in "ab")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    sa, sb = (torch.load(tmp_path / d / "checkpoints" / "epoch_000002" / "state.pt", weights_only=True)
              for d in "ab")
    assert sa["counters"] == sb["counters"] and sa["counters"]["g_steps"] >= 1  # pickscore: by its trigger
    print(f"\n{kind}: 2 epochs straight in {minutes:.1f} min\n{straight[-600:]}")
    if kind == "grpo":  # the exported LoRA in plain diffusers
        import model as M
        pipe = M.random_pipeline("sd3.5-medium", dtype=torch.bfloat16)
        lora = tmp_path / "a" / "checkpoints" / "epoch_000002" / "lora"
        pipe.load_lora_weights(str(lora))
        adapted = [m for m in pipe.transformer.modules() if hasattr(m, "lora_A")]
        assert len(adapted) == 191


def test_first_recompute_is_exact_in_bf16_at_sd35m_shapes():
    """The CUDA-only ratio test's question on the CPU's bf16 (autocast, AMX where the CPU has it): at the
    real architecture, sampled in batches of 4, trained in micro-batches of 2, grad on, lr 0 — every pass
    is a first recompute, so every ratio must be exactly 1."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import data
    import model as M
    import train as T
    from test_train import tiny_cfg
    torch.manual_seed(0)
    cfg = tiny_cfg(pretrained="random:sd3.5-medium", resolution=64, max_sequence_length=128,
                   mixed_precision="bf16", num_steps=3, guidance_scale=4.5, group_size=4, sample_batch_size=4,
                   train_batch_size=2, updates_per_epoch=2, clip_range=1e-6, lora_rank=32, lora_alpha=64)
    gen = M.build_generator(cfg, torch.device("cpu"))
    for g in gen.opt.param_groups:
        g["lr"] = 0.0
    prompts = [p["prompt"] for p in data.load_prompts(cfg.train_prompts)][:1] * cfg.group_size
    batch = T.sample_epoch(cfg, 0, gen, prompts, list(range(len(prompts))), 0, progress=False)
    info = T.train_generator(cfg, 0, gen, batch, torch.linspace(-1, 1, len(prompts)),
                             dict(g_steps=0, bad_updates=0), progress=False)
    print(f"sampler vs training max |log ratio| {info['sampler_logp_gap']:.2e}")
    assert info["clipfrac"] == 0 and info["approx_kl"] == 0, info
