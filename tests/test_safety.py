"""Nothing lost, no traceback: intact-checkpoint resume, run folders never mixed, non-finite tensors never
saved, bad numbers refused before the model loads, inputs read as people mean them."""
import dataclasses
import json
import re
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import checkpoint as C
import outputs as O
import configurator
import data
import train as T
from inproc import run_main
from test_train import ADV_PRESET, ROOT, tiny_cfg


def _run(args, ok=True, preset=ADV_PRESET, script="train.py"):
    """`python script [preset] args`, in this process (a traceback fails the test)."""
    return run_main(script, [*([preset] if preset else []), *args], ok)


def _same_weights(a, b, name="trainable.safetensors"):
    wa, wb = load_file(os.path.join(a, name)), load_file(os.path.join(b, name))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# --- resume ---------------------------------------------------------------------------------------

def test_torn_metrics_line_and_damaged_newest_checkpoint_do_not_block_resume(tmp_path):
    """A kill mid-write leaves a half line (and NULs) in metrics.jsonl; the newest checkpoint is truncated,
    a stray folder and an empty one sit beside it. --resume warns, takes the newest intact checkpoint, and
    ends bitwise where an uninterrupted run ends."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _run([f"--out_dir={a}", "--epochs=4"])
    _run([f"--out_dir={b}", "--epochs=3"])
    ck = os.path.join(b, "checkpoints")
    with open(os.path.join(b, "metrics.jsonl"), "ab") as f:
        f.write(b'{"epoch": 3, "reward_mea' + b"\x00" * 8)
    path = os.path.join(ck, "epoch_000003", "trainable.safetensors")
    open(path, "r+b").truncate(os.path.getsize(path) // 2)
    os.makedirs(os.path.join(ck, "epoch_000004"))                  # empty: a kill before anything was written
    os.makedirs(os.path.join(ck, "epoch_000099.bak"))              # not a checkpoint name
    out = _run([f"--out_dir={b}", "--epochs=4", "--resume"]).stdout
    assert "skipping damaged checkpoint" in out and "epoch_000003: trainable.safetensors has" in out
    assert "resumed from" in out and "epoch_000002" in out and "(2 epochs done; next: epoch 3/" in out
    assert _same_weights(os.path.join(a, "checkpoints", "epoch_000004"), os.path.join(ck, "epoch_000004"))
    assert [json.loads(line)["epoch"] for line in open(os.path.join(b, "metrics.jsonl"))] == [0, 1, 2, 3]


def test_resume_refuses_when_no_checkpoint_is_intact_and_changed_keys(tmp_path):
    out = str(tmp_path / "run")
    _run([f"--out_dir={out}", "--epochs=1"])
    err = _run([f"--out_dir={out}", "--epochs=2", "--resume", "--lora_rank=8"], ok=False).stderr
    assert "lora_rank changed would be another experiment" in err and "4 → 8" in err
    p = _run([f"--out_dir={out}", "--epochs=2", "--resume", "--lr=0.5"])     # applied, and said
    assert "lr: 0.001 → 0.5" in p.stdout
    state = torch.load(os.path.join(out, "checkpoints", "epoch_000002", "state.pt"), weights_only=True)
    assert all(g["lr"] == 0.5 for g in state["optimizer"]["param_groups"])
    for d in C.checkpoints(out):
        os.remove(os.path.join(d, "state.pt"))
    err = _run([f"--out_dir={out}", "--epochs=3", "--resume"], ok=False).stderr
    assert "no intact checkpoint" in err


@pytest.mark.parametrize("preset, extra", [
    (os.path.join("config", "tiny.py"), ["--prompts_per_epoch=2", "--group_size=4", "--sample_batch_size=8",
                                         "--train_batch_size=4", "--d_warmup=0", "--eval_every=0"]),
    (ADV_PRESET, ["--eval_every=1", "--test_prompts=assets/tiny_prompts.txt", "--eval_num_steps=2"]),
], ids=["shapes_world", "in_loop_eval"])
def test_resume_is_bitwise_in_the_shapes_world_and_with_in_loop_evaluation(tmp_path, preset, extra):
    """A prompt's embedding does not depend on which prompts it was encoded with, so the cache rebuilt
    after a resume (other prompts, other order) gives the same numbers."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _run([f"--out_dir={a}", "--epochs=3", *extra], preset=preset)
    _run([f"--out_dir={b}", "--epochs=1", *extra], preset=preset)
    _run([f"--out_dir={b}", "--epochs=3", "--resume", *extra], preset=preset)
    for name in ("trainable.safetensors", "ema.safetensors"):
        assert _same_weights(*(os.path.join(d, "checkpoints", "epoch_000003") for d in (a, b)), name)


# --- the run folder ---------------------------------------------------------------------------------

def test_a_used_out_dir_is_resumed_or_overwritten_never_mixed(tmp_path):
    out = tmp_path / "run"
    _run([f"--out_dir={out}", "--epochs=2"])
    (out / "notes.txt").write_text("mine")
    err = _run([f"--out_dir={out}", "--epochs=1"], ok=False).stderr
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert len(open(out / "metrics.jsonl").readlines()) == 2
    _run([f"--out_dir={out}", "--epochs=1", "--overwrite=True"])
    assert C.checkpoints(str(out)) == [str(out / "checkpoints" / "epoch_000001")]
    assert (out / "notes.txt").read_text() == "mine"                      # not a run's file: kept


def test_a_second_live_run_on_one_folder_is_refused(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, '.');"
                               "import outputs as O, configurator as K;"
                               f"O.claim_out_dir(K.Config(out_dir={str(tmp_path)!r}));"
                               " print('held', flush=True);"
                               "time.sleep(60)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit, match="in use by another run"):
            O.claim_out_dir(configurator.Config(out_dir=str(tmp_path)))
    finally:
        holder.kill()


# --- saving -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built():
    import model as M
    import reward as R
    cfg = tiny_cfg(ADV_PRESET)
    gen = M.build_generator(cfg, torch.device("cpu"))
    adv = R.build_adversary(cfg, torch.device("cpu"))
    return cfg, gen, adv


def test_a_kill_while_pruning_leaves_no_half_checkpoint_and_the_next_save_finishes_it(tmp_path, built,
                                                                                      monkeypatch):
    import dataclasses
    import shutil
    cfg, gen, adv = built
    cfg = dataclasses.replace(cfg, out_dir=str(tmp_path), keep_last=1)
    counters = dict(g_epochs=0, g_steps=0, d_steps=0, bad_updates=0)
    C.save(cfg, 1, gen, adv, counters)
    rmtree = shutil.rmtree

    def killed(path, *a, **k):  # the process dies having deleted half of the pruned checkpoint
        if not path.endswith(".pruned"):
            return rmtree(path, *a, **k)
        os.remove(os.path.join(path, C.MANIFEST))
        raise KeyboardInterrupt
    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        C.save(cfg, 2, gen, adv, counters)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    root = tmp_path / "checkpoints"
    assert sorted(os.listdir(root)) == ["epoch_000001.pruned", "epoch_000002"]  # not a damaged epoch_000001
    assert [os.path.basename(p) for p in C.checkpoints(str(tmp_path))] == ["epoch_000002"]
    C.save(cfg, 3, gen, adv, counters)
    assert sorted(os.listdir(root)) == ["epoch_000003"]


@pytest.mark.parametrize("where", ["ema", "discriminator", "adam"])
def test_a_non_finite_tensor_is_never_saved_and_nothing_is_pruned(tmp_path, built, where):
    import dataclasses
    cfg, gen, adv = built
    cfg = dataclasses.replace(cfg, out_dir=str(tmp_path), keep_last=1)
    counters = dict(g_epochs=0, g_steps=0, d_steps=0, bad_updates=0)
    good = C.save(cfg, 1, gen, adv, counters)
    victim = {"ema": lambda: next(iter(gen.ema.shadow.values())), "discriminator": lambda: adv.head[0].weight,
              "adam": lambda: adv.opt.state[adv.head[0].weight]["exp_avg"]}
    adv.d_step(adv.features(torch.rand(2, 3, 32, 32)), adv.features(torch.rand(2, 3, 32, 32)))  # Adam state
    t = victim[where]()
    keep = t.detach().clone()
    with torch.no_grad():
        t.view(-1)[0] = float("nan")
    try:
        with pytest.raises(SystemExit, match="non-finite values in"):
            C.save(cfg, 2, gen, adv, counters)
    finally:
        with torch.no_grad():
            t.copy_(keep)
    assert os.listdir(tmp_path / "checkpoints") == ["epoch_000001"] and C.verify(good) is None


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, built, monkeypatch):
    import dataclasses
    import errno
    cfg, gen, adv = built
    cfg = dataclasses.replace(cfg, out_dir=str(tmp_path))
    counters = dict(g_epochs=0, g_steps=0, d_steps=0, bad_updates=0)
    C.save(cfg, 1, gen, adv, counters)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(SystemExit,
                       match="disk full while writing .*state.pt; the last intact checkpoint is "):
        C.save(cfg, 2, gen, adv, counters)
    assert os.listdir(tmp_path / "checkpoints") == ["epoch_000001"]


# --- numbers refused before the model loads ---------------------------------------------------------

@pytest.mark.parametrize("arg, key", [
    ("--lr=0", "lr"), ("--lr=-1e-4", "lr"), ("--sample_batch_size=0", "sample_batch_size"),
    ("--train_batch_size=0", "train_batch_size"), ("--updates_per_epoch=0", "updates_per_epoch"),
    ("--save_every=0", "save_every"), ("--ema_every=0", "ema_every"), ("--window_size=0", "window_size"),
    ("--window_size=9", "window_size"), ("--window_start=7", "window"), ("--num_steps=0", "num_steps"),
    ("--prompts_per_epoch=0", "prompts_per_epoch"), ("--resolution=0", "resolution"),
    ("--resolution=30", "resolution"), ("--lora_rank=-1", "lora_rank"),
    ("--reward={'brightness': 'x'}", "reward"), ("--d_lr=-1e-4", "d_lr"),
    ("--dino_image_size=0", "dino_image_size"), ("--max_grad_norm=-1", "max_grad_norm"),
    ("--noise_level=1.5", "noise_level"), ("--beta_kl=-1", "beta_kl"),
    ("--guidance_scale=0.5", "guidance_scale"), ("--epochs=0", "epochs"), ("--keep_last=-1", "keep_last"),
    ("--keep_last=0", "keep_last"), ("--lr=nan", "lr"), ("--clip_range=0", "clip_range"),
    ("--seed=-1", "seed"), (f"--seed={2 ** 64}", "seed"),
    ("--pretrained=random:nope", "known: random:sd3.5-medium"),
    ("--dino_image_size=3", "dino_image_size 3 must be a multiple of the feature backbone's patch size"),
    (f"--resolution={2 ** 20}", "resolution 1048576 is more than the position embedding of random:tiny"),
    ("--lr=1e30", "lr must be ≤ 1"), ("--clip_range=1e9", "clip_range"),
    ("--weight_decay=1e6", "weight_decay"),
    ("--reward={}", "reward is empty"), ("--d_hidden=0", "d_hidden"), ("--d_patches=0", "d_patches"),
    ("--d_patch_loss=-1", "d_patch_loss"), ("--d_cls_weight=1.5", "d_cls_weight"),
])
def test_bad_numbers_are_refused_in_one_line_before_the_model_loads(tmp_path, arg, key):
    with pytest.raises(SystemExit, match=key) as e:
        T.check_inputs(T.parse_args([os.path.join(ROOT, "config", "tiny_random.py"), arg,
                                     f"--out_dir={tmp_path / 'run'}"]), 1)
    assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("args, says", [
    (["--beta_kl=0.1", "--lora_rank=0"], "beta_kl must be 0 without LoRA"),
    (["--reward={'dino_adv': 1.0}", "--d_replay=2", "--d_conditional=True"],
     "d_replay keeps unconditional fakes: not with d_conditional"),
    (["--mixed_precision=fp16"], "mixed_precision must be 'bf16' or 'no', got 'fp16'"),
    (["--schedule=papr"], "schedule must be 'paper', 'shared' or 'frozen', got 'papr'"),
])
def test_settings_that_contradict_each_other_are_refused_in_one_line(tmp_path, args, says):
    with pytest.raises(SystemExit, match=re.escape(says)) as e:
        T.check_inputs(T.parse_args([os.path.join(ROOT, "config", "tiny_random.py"), *args,
                                     f"--out_dir={tmp_path / 'run'}"]), 1)
    assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "run")


def test_an_out_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit, match="is a file"):
        T.check_inputs(tiny_cfg(out_dir=str(tmp_path / "f")), 1)
    for where, why in ((tmp_path / "f" / "run", "Not a directory"), ("/proc/advgrpo/run", "No such file")):
        with pytest.raises(SystemExit, match=f"out_dir {where} cannot be made: {why}") as e:
            T.check_inputs(tiny_cfg(out_dir=str(where)), 1)
        assert "\n" not in str(e.value)


def test_the_discriminator_knobs_are_keys_and_another_width_is_not_resumed(tmp_path):
    import reward as R
    d = R.build_adversary(tiny_cfg(ADV_PRESET, d_hidden=8, d_patches=4, d_patch_loss=0.5, d_cls_weight=0.2),
                          torch.device("cpu"))
    assert (len(d.head[0].bias), d.n_patches, d.patch_loss_weight, d.cls_reward_weight) == (8, 4, 0.5, 0.2)
    cls, patches = torch.randn(3, 32), torch.randn(3, 16, 32)
    c, p = d._logits(cls, patches, generator=torch.Generator().manual_seed(0))
    assert p.shape == (3, 4) and torch.allclose(d._combine(c, p), 0.2 * c + 0.8 * p.mean(1))
    out = tmp_path / "run"
    _run([f"--out_dir={out}", "--epochs=1", "--d_hidden=8"])
    _run([f"--out_dir={out}", "--epochs=2", "--resume"])  # the run's own config: the 8-wide head goes on
    assert json.load(open(out / "config.json"))["d_hidden"] == 8
    err = _run([f"--out_dir={out}", "--epochs=3", "--resume", "--d_hidden=16", "--allow_config_change=True"],
               ok=False).stderr
    last = err.strip().splitlines()[-1]
    assert "d_hidden 8 → 16: the checkpoint's trained tensors have other shapes" in last


@pytest.mark.parametrize("text, msg", [("lr: 0.1\n", "annotation, not an assignment"),
                                       ("lr = (\n", "syntax error"), ("lr = 1 / 0\n", "ZeroDivisionError"),
                                       (None, "cannot be read as a Python file: Is a directory")])
def test_broken_presets_are_refused_naming_the_file(tmp_path, text, msg):
    p = tmp_path / "preset.py"
    p.mkdir() if text is None else p.write_text(text)
    with pytest.raises(SystemExit, match=msg) as e:
        T.parse_args([str(p)])
    assert str(p) in str(e.value)


# --- sample.py -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("evalrun") / "run"
    _run([f"--out_dir={out}", "--epochs=1"])
    return out


@pytest.mark.parametrize("case", ["missing", "no_config", "other_arch", "n_zero", "no_prompts", "no_summary",
                                  "truncated"])
def test_eval_refuses_bad_input_in_one_line(run_dir, tmp_path, case):
    import shutil
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run_dir / "checkpoints" / "epoch_000001", ckpt)
    args = {"missing": ["--ckpt", str(tmp_path / "nope")], "no_config": ["--ckpt", str(ckpt)],
            "other_arch": ["--ckpt", str(ckpt)], "n_zero": ["--ckpt", str(ckpt), "--n_per_prompt", "0"],
            "no_prompts": ["--ckpt", str(ckpt), "--prompts", str(tmp_path / "none.txt")],
            "no_summary": ["--summarize", str(tmp_path)], "truncated": ["--ckpt", str(ckpt)]}[case]
    if case == "no_config":
        os.remove(ckpt / "config.json")
    if case == "other_arch":  # a checkpoint whose config names another model than its weights were made for
        cfg = json.load(open(ckpt / "config.json"))
        cfg["lora_rank"] = 8
        json.dump(cfg, open(ckpt / "config.json", "w"))
        os.remove(ckpt / C.MANIFEST)
    if case == "truncated":
        open(ckpt / "ema.safetensors", "r+b").truncate(10)
    err = _run(args, ok=False, preset=None, script="sample.py").stderr
    expect = {"missing": "no such folder", "no_config": "not an intact checkpoint",
              "other_arch": "do not fit", "n_zero": "n_per_prompt", "no_prompts": "does not exist",
              "no_summary": "no summary.json", "truncated": "ema.safetensors has 10 bytes"}[case]
    assert expect in err, err[-2000:]


def test_eval_writes_outside_the_checkpoints_and_takes_a_run_folder(run_dir):
    p = _run(["--ckpt", str(run_dir), "--prompt", "a red circle on the left", "--n_per_prompt", "1"],
             preset=None, script="sample.py")
    assert "newest intact checkpoint" in p.stdout
    (folder,) = os.listdir(run_dir / "eval")  # other prompts than the run's: epoch_000001-<settings hash>
    assert folder.startswith("epoch_000001-") and os.path.isfile(run_dir / "eval" / folder / "grid.png")
    assert os.listdir(run_dir / "checkpoints" / "epoch_000001").count("eval") == 0


# --- images and prompt files ------------------------------------------------------------------------

def test_images_are_read_as_people_see_them(tmp_path):
    from PIL import Image
    a = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)   # 0..65520: a 16-bit ramp
    Image.fromarray(a).save(tmp_path / "g16.png")
    im = data._load_image(str(tmp_path / "g16.png"), None)
    assert im.shape == (3, 64, 64) and abs(im.float().mean().item() - a.mean() / 257) < 1
    # EXIF orientation 6 (rotate 90° clockwise to view): a 40×20 file is a 20×40 picture
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert tuple(data._load_image(str(tmp_path / "rot.jpg"), None).shape) == (3, 40, 20)


def test_prompt_files_are_read_as_people_mean_them(tmp_path):
    (tmp_path / "bom.txt").write_bytes("\ufeffa red circle\r\na blue\x0csquare\n".encode())
    assert ([p["prompt"] for p in data.load_prompts(str(tmp_path / "bom.txt"))]
            == ["a red circle", "a blue\x0csquare"])
    (tmp_path / "u.jsonl").write_text(json.dumps({"prompt": "line\u2028sep and \u0085 next"},
                                                 ensure_ascii=False) + "\n")
    assert data.load_prompts(str(tmp_path / "u.jsonl"))[0]["prompt"] == "line\u2028sep and \u0085 next"
    (tmp_path / "deep.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ValueError, match="nested too deeply"):
        data.ReferenceSet.from_index(str(tmp_path / "deep.json"))


def test_the_recipe_hint_appears_only_for_the_default_prompt_path(tmp_path):
    with pytest.raises(SystemExit, match="make demo"):
        T.check_inputs(T.parse_args([]), 1)
    with pytest.raises(SystemExit) as e:
        T.check_inputs(T.parse_args([f"--train_prompts={tmp_path / 'mine.txt'}"]), 1)
    assert "mine.txt" in str(e.value) and "make demo" not in str(e.value)


def test_a_preset_states_what_differs_from_its_base(tmp_path):
    """`base = "file.py"` (relative to the preset's folder) is applied first; a mistake in either file is
    refused naming that file; a circle of bases is refused."""
    (tmp_path / "a.py").write_text("lr = 0.5\nseed = 3\n")
    (tmp_path / "b.py").write_text('base = "a.py"\nseed = 4\n')
    cfg = T.parse_args([str(tmp_path / "b.py")])
    assert (cfg.lr, cfg.seed) == (0.5, 4)
    (tmp_path / "a.py").write_text("lr = 0.5\nseedd = 3\n")
    with pytest.raises(SystemExit, match=r"a\.py: unknown config key 'seedd'"):
        T.parse_args([str(tmp_path / "b.py")])
    (tmp_path / "c.py").write_text('base = "nothere.py"\n')
    with pytest.raises(SystemExit, match="preset file not found: .*nothere.py"):
        T.parse_args([str(tmp_path / "c.py")])
    (tmp_path / "a.py").write_text('base = "b.py"\n')
    with pytest.raises(SystemExit, match="in a circle"):
        T.parse_args([str(tmp_path / "b.py")])
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:  # the demo's contrast: config/tiny.py and four keys
        tiny, frozen = T.parse_args(["config/tiny.py"]), T.parse_args(["config/tiny_frozen.py"])
    finally:
        os.chdir(cwd)
    assert frozen == dataclasses.replace(tiny, schedule="frozen", d_warmup=10, d_steps=10,
                                         out_dir="out/tiny_frozen")
    for name in os.listdir(os.path.join(ROOT, "config")):
        assert "exec(" not in open(os.path.join(ROOT, "config", name)).read(), name


def test_one_count_of_non_finite_updates_in_a_row():
    cfg = tiny_cfg(max_bad_updates=2)
    counters = dict(bad_updates=0)
    T.count_update(cfg, counters, False, False, "skipped")
    T.count_update(cfg, counters, True, False, "")               # a finite update resets the count
    T.count_update(cfg, counters, False, False, "skipped")
    assert counters["bad_updates"] == 1
    with pytest.raises(SystemExit, match="2 non-finite updates in a row"):
        T.count_update(cfg, counters, False, False, "skipped")
