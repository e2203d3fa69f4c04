"""Faults and bad input: kill -9 and resume, SIGTERM, broken files, non-finite rewards."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import checkpoint as C
import reward as R
import train as T
from inproc import run_main
from test_train import ADV_PRESET, ROOT, tiny_cfg


def _cmd(args):
    return [sys.executable, "train.py", ADV_PRESET] + args


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _run(args, ok=True):
    return run_main("train.py", [ADV_PRESET, *args], ok)  # in this process; kills need real ones (_cmd)


def _ckpts(out):
    d = os.path.join(out, "checkpoints")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def _wait_for(pred, proc, timeout=120):
    t = time.time()
    while not pred():
        assert proc.poll() is None, "run ended before the event"
        assert time.time() - t < timeout, "timed out"
        time.sleep(0.05)


def test_sigkill_mid_run_then_resume_is_bitwise_identical(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    args = ["--epochs=16", "--save_every=4", "--schedule=paper", "--d_times=3"]
    _run([f"--out_dir={a}"] + args)
    proc = subprocess.Popen(_cmd([f"--out_dir={b}"] + args), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # kill -9 somewhere inside epoch 9 or 10, between checkpoints
    metrics = os.path.join(b, "metrics.jsonl")
    _wait_for(lambda: os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 9, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _ckpts(b)[-1] == "epoch_000008"
    out = _run([f"--out_dir={b}", "--resume"] + args).stdout
    assert "resumed from" in out and "(8 epochs done; next: epoch 9/" in out
    for name in ("trainable.safetensors", "ema.safetensors"):
        wa, wb = (load_file(os.path.join(d, "checkpoints", "epoch_000016", name)) for d in (a, b))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = (torch.load(os.path.join(d, "checkpoints", "epoch_000016", "state.pt"), weights_only=True)
              for d in (a, b))
    assert all(torch.equal(v, sb["adversary"]["head"][k]) for k, v in sa["adversary"]["head"].items())
    assert sa["counters"] == sb["counters"]
    # the redone epochs were not logged twice
    assert [json.loads(l)["epoch"] for l in open(os.path.join(b, "metrics.jsonl"))] == list(range(16))


def test_sigterm_finishes_the_epoch_saves_and_exits_zero(tmp_path):
    out = str(tmp_path / "run")
    proc = subprocess.Popen(_cmd([f"--out_dir={out}", "--epochs=100000", "--save_every=100000"]), cwd=ROOT,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    metrics = os.path.join(out, "metrics.jsonl")
    _wait_for(lambda: os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=60)
    last = json.loads(open(metrics).readlines()[-1])["epoch"]
    assert proc.returncode == 0 and f"SIGTERM: saved epoch_{last + 1:06d} ({last + 1} epochs done)" in stdout
    assert _ckpts(out) == [f"epoch_{last + 1:06d}"]  # named by epochs done


def test_incomplete_checkpoint_is_ignored_and_old_ones_pruned(tmp_path):
    out = str(tmp_path / "run")
    _run([f"--out_dir={out}", "--epochs=5", "--keep_last=2"])
    assert _ckpts(out) == ["epoch_000004", "epoch_000005"]
    os.makedirs(os.path.join(out, "checkpoints", "epoch_000009.tmp"))  # a save killed half-way
    assert C.latest(out).endswith("epoch_000005")


@pytest.mark.parametrize("case", ["missing", "corrupt", "empty"])
def test_broken_reference_images_stop_before_any_weight_is_written(tmp_path, case):
    from PIL import Image
    refs = tmp_path / "refs"
    refs.mkdir()
    Image.new("L", (17, 23), 128).save(refs / "gray_odd.png")          # fine: converted and resized
    Image.new("RGBA", (40, 40), (255, 0, 0, 0)).save(refs / "rgba.png")  # fine: composited on white
    bad = {"missing": "nothere.png", "corrupt": "corrupt.png", "empty": "empty.png"}[case]
    if case == "corrupt":
        (refs / bad).write_bytes(os.urandom(300))
    if case == "empty":
        (refs / bad).write_bytes(b"")
    prompts = [l.strip() for l in open(os.path.join(ROOT, "assets", "tiny_prompts.txt")) if l.strip()]
    idx = {p: ["gray_odd.png", "rgba.png", bad] for p in prompts}
    (refs / "index.json").write_text(json.dumps(idx))
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit, match=bad):
        T.train(tiny_cfg(ADV_PRESET, out_dir=out, references=str(refs / "index.json")))
    assert not os.path.exists(out)
    # with skip_bad_references the broken file is dropped with a warning and training goes on
    with pytest.warns(UserWarning, match="1"):
        T.train(tiny_cfg(ADV_PRESET, out_dir=out, references=str(refs / "index.json"),
                         skip_bad_references=True, epochs=1))
    assert _ckpts(out) == ["epoch_000001"]


@pytest.mark.parametrize("text,where", [("", "empty"), ("a red circle\n\nblue\n", ":2")])
def test_bad_prompt_files_are_refused_with_the_line(tmp_path, text, where):
    f = tmp_path / "prompts.txt"
    f.write_text(text)
    cfg = tiny_cfg(ADV_PRESET, out_dir=str(tmp_path / "run"))
    cfg.train_prompts = str(f)
    with pytest.raises(SystemExit) as e:
        T.train(cfg)
    assert str(f) in str(e.value) and where in str(e.value)


def test_bad_config_values_are_refused_before_loading(tmp_path):
    out = str(tmp_path / "run")
    for kw, msg in [(dict(resolution=30), "resolution 30 must be a multiple of 4"),
                    (dict(train_batch_size=3), "multiple of train_batch_size"),
                    (dict(reward={"brightnes": 1.0}), "unknown reward 'brightnes'")]:
        with pytest.raises(SystemExit, match=msg):
            T.train(tiny_cfg(ADV_PRESET, out_dir=out, **kw))
        assert not os.path.exists(os.path.join(out, "checkpoints"))


def test_non_finite_rewards_skip_the_update_then_stop(tmp_path):
    calls = {"n": 0}

    @R.register("flaky_test_reward")
    def flaky(**_):
        def fn(images, prompts, metadata):
            calls["n"] += 1
            bad = calls["n"] in (1, 3, 4)  # NaN on epochs 0, 2, 3
            r = images.mean(dim=(1, 2, 3))
            return (r * float("nan") if bad else r), {}
        return fn

    cfg = tiny_cfg(ADV_PRESET, out_dir=str(tmp_path), reward={"flaky_test_reward": 1.0}, epochs=6,
                   max_bad_updates=2)
    with pytest.raises(SystemExit, match="2 non-finite updates in a row"):
        T.train(cfg)
    lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [l["g_epochs"] for l in lines] == [0, 1, 1]  # epoch 0 skipped, 1 trained, 2 skipped, 3 stops
    for d in _ckpts(str(tmp_path)):
        w = load_file(os.path.join(tmp_path, "checkpoints", d, "trainable.safetensors"))
        assert all(torch.isfinite(v).all() for v in w.values())
    del R.REWARDS["flaky_test_reward"]


def test_broken_style_folder_is_refused_naming_the_file(tmp_path):
    """Style transfer from a folder of images, one of which is truncated: a clear error before training."""
    from PIL import Image
    folder = tmp_path / "style"
    folder.mkdir()
    Image.new("RGB", (48, 48), (10, 10, 10)).save(folder / "ok.png")
    Image.new("LA", (31, 17), (90, 255)).save(folder / "gray_alpha_odd.png")
    good = (folder / "ok.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(SystemExit, match="truncated.png"):
        T.train(tiny_cfg(ADV_PRESET, out_dir=str(tmp_path / "run"), references=str(folder)))
    assert not os.path.exists(tmp_path / "run")
