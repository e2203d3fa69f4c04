"""Logs and pictures that read well: a redirected log is plain lines with one epoch numbering, the ETA is
not skewed by the first evaluation, curves and grids say what they show, the demo names the log of the
run that failed, and the before → after training reward compares two different windows."""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import types

import numpy as np
import pytest
from PIL import Image

import eval as E
import train as T
from inproc import run_main
from test_train import ADV_PRESET, ROOT


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A 3-epoch run, its stdout and stderr into one file-like stream (no terminal), as `> log 2>&1`; the
    evaluation at epoch 0 takes 1000 s on a fake clock; curves.png's figure kept for inspection."""
    out = tmp_path_factory.mktemp("logs") / "run"
    offset, figures, mp = [0.0], [], pytest.MonkeyPatch()
    mp.setattr(T, "time", types.SimpleNamespace(time=lambda: time.time() + offset[0]))
    evaluate = E.evaluate

    def slow_first(cfg, gen, phi, refs, prompts, epoch, history, rank=0, **kw):
        offset[0] += 1000.0 if epoch == 0 else 0.0
        return evaluate(cfg, gen, phi, refs, prompts, epoch, history, rank, **kw)
    mp.setattr(E, "evaluate", slow_first)
    mp.setattr(E.plt, "close", figures.append)
    log = io.StringIO()
    try:
        with contextlib.chdir(ROOT), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            T.main([ADV_PRESET, f"--out_dir={out}", "--epochs=3", "--eval_every=3", "--eval_num_steps=2",
                    "--test_prompts=assets/tiny_prompts.txt"])
    finally:
        mp.undo()
    return out, log.getvalue(), figures


def test_a_redirected_log_is_plain_lines_with_one_epoch_numbering(logged):
    out, log, _ = logged
    assert "\r" not in log  # no progress bars outside a terminal
    epochs = [line for line in log.split("\n") if line.startswith("epoch ")]
    assert [line.split("|")[0].split()[1] for line in epochs] == ["1/3", "2/3", "3/3"]
    assert all("| steps so far G " in line for line in epochs)
    evals = [line.split(":")[0] for line in log.split("\n") if line.startswith("eval @ epoch")]
    assert evals == ["eval @ epoch 0", "eval @ epoch 3"]  # 3 epochs done: the last epoch line's number
    assert "held-out before (epoch 0) → after (epoch 3)" in log
    held_out = log.split("held-out before (epoch 0) → after (epoch 3):\n")[1].split("\n")
    assert "train_reward" not in log and held_out[-2].startswith("training reward, first 1 → last 1 G epochs")
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    # the first evaluation (1000 s on the clock) counts neither in the epoch's time nor in the ETA
    assert rows[0]["seconds"] < 100 and rows[0]["eta_s"] < 200


def test_train_reward_before_and_after_are_different_windows(logged):
    out, _, _ = logged
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    trained = [r["reward_mean"] for r in rows if "reward_mean" in r]
    assert len(trained) == 3  # < 10 G epochs: the first and the last epoch, not twice the mean of all
    s = json.load(open(out / "summary.json"))["train_reward"]
    assert (s["before"], s["after"]) == (trained[0], trained[-1]) and s["before"] != s["after"]


def test_curves_have_a_title_fd_dino_and_the_legend_off_the_data(logged):
    out, _, figures = logged
    (fig,) = figures
    assert fig._suptitle.get_text() == "run: training reward against held-out metrics"
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    fd = [r["eval/fd_dino"] for r in rows if "eval/fd_dino" in r]
    assert len(fd) == 2 and any(list(line.get_ydata()) == fd for ax in fig.axes for line in ax.lines)
    fig.canvas.draw()
    legend = fig.legends[0].get_window_extent()
    assert not any(legend.overlaps(ax.get_window_extent()) for ax in fig.axes)
    assert "held-out fd_dino (below)" in [t.get_text() for t in fig.legends[0].get_texts()]


def test_the_sample_grid_has_a_title(logged):
    out, _, _ = logged
    grid = np.asarray(Image.open(out / "samples" / "epoch_000003.png").convert("L"))
    # 4 prompts × 1 image of 32 px, in blocks (eval.grid_layout) under a 20 px title band
    _, cols, _, bh = E.grid_layout(4, 1, 32)
    assert grid.shape[0] == -(-4 // cols) * bh + 20
    band = grid[:20]
    assert (band < 100).mean() > 0.02 and (band > 250).mean() > 0.6  # dark text on white


@pytest.mark.parametrize("fails, says, not_says", [
    ("config/tiny.py", "the Adv-GRPO run failed (exit 3): see its output above", "frozen.log"),
    ("config/tiny_frozen.py", "the fixed-reward run failed (exit 3): see out/demo/frozen.log", "Adv-GRPO"),
])
def test_make_demo_names_the_run_that_failed(tmp_path, fails, says, not_says):
    shutil.copy(os.path.join(ROOT, "Makefile"), tmp_path / "Makefile")
    fake = tmp_path / "fakepython"
    fake.write_text(f'#!/bin/sh\ncase "$*" in *"{fails} "*) exit 3;; esac\nexit 0\n')
    fake.chmod(0o755)
    p = subprocess.run(["make", "-s", "-o", ".venv/.installed", "demo", f"PY={fake}"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and says in p.stdout and not_says not in p.stdout, p.stdout + p.stderr


def test_data_py_help_exits_0(monkeypatch):
    import runpy
    monkeypatch.setattr(sys, "argv", ["data.py", "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, "data.py"), run_name="__main__")
    assert e.value.code == 0


def test_an_oracle_runs_fd_dino_is_measured_by_sample_py(tmp_path):
    """A run whose rewards need no DINO features (the oracle toy_geneval) loads no backbone: its in-loop
    evaluation says FD-DINO is skipped, and sample.py --ckpt measures it from the run's configured backbone
    and references (docs/RESULTS.md's footnote)."""
    out = tmp_path / "oracle"
    run_main("train.py", [ADV_PRESET, f"--out_dir={out}", "--epochs=1", "--eval_every=1",
                          "--eval_num_steps=2", "--test_prompts=assets/tiny_prompts.txt",
                          "--reward={'toy_geneval': 1.0}"])
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert all("eval/fd_dino" not in r for r in rows) and "eval/toy_geneval" in rows[0]
    run_main("sample.py", ["--ckpt", str(out)])
    assert json.load(open(out / "eval" / "epoch_000001" / "metrics.json"))["metrics"]["fd_dino"] > 0
