"""--resume restores the run it continues, damaged checkpoints and metrics are one line (and skipped), a
full disk is one line, --overwrite deletes only what a run of ours wrote, and the final report survives a
SIGTERM or a kill at the end."""
import errno
import json
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoint as C
import outputs as O
import configurator
import eval as E
import train as T
from inproc import run_main
from test_train import ADV_PRESET, ROOT, tiny_cfg


def _run(args, ok=True):
    return run_main("train.py", [ADV_PRESET, *args], ok)


def _ck(out, n):
    return os.path.join(out, "checkpoints", f"epoch_{n:06d}")


def _rehash(ck):
    """The manifest of checkpoint `ck` rewritten for its files as they are now (a tampered checkpoint)."""
    files = [n for n in C._files(ck) if n != C.MANIFEST]
    manifest = {n: dict(bytes=os.path.getsize(os.path.join(ck, n)), sha256=C._sha256(os.path.join(ck, n)))
                for n in files}
    with open(os.path.join(ck, C.MANIFEST), "w") as f:
        json.dump(manifest, f)


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """A finished 2-epoch run with a checkpoint after each epoch (copied by each test that damages it)."""
    out = str(tmp_path_factory.mktemp("base") / "run")
    _run([f"--out_dir={out}", "--epochs=2", "--save_every=1"])
    return out


# --- --resume starts from the run's own config -------------------------------------------------

def test_resume_continues_the_saved_config_and_applies_only_the_given_keys(tmp_path):
    """A run made with overrides is resumed with a plain --resume (the preset says prompts_per_epoch=2,
    save_every=1): the run's prompts_per_epoch, save_every and lr stay, --lr given now is the one change."""
    out = str(tmp_path / "run")
    _run([f"--out_dir={out}", "--epochs=2", "--prompts_per_epoch=1", "--save_every=2", "--lr=0.002"])
    first = json.load(open(os.path.join(out, "config.json")))
    p = _run([f"--out_dir={out}", "--resume", "--epochs=4", "--lr=0.003"])
    assert "prompts_per_epoch=2, save_every=1 are not applied" in p.stdout
    assert "lr: 0.002 → 0.003" in p.stdout and "prompts_per_epoch:" not in p.stdout
    now = json.load(open(os.path.join(out, "config.json")))
    assert {k: v for k, v in now.items() if k not in ("epochs", "lr", "resume")} == \
           {k: v for k, v in first.items() if k not in ("epochs", "lr", "resume")}
    assert (now["epochs"], now["lr"], now["prompts_per_epoch"], now["save_every"]) == (4, 0.003, 1, 2)
    assert os.listdir(os.path.join(out, "checkpoints")) and C.checkpoints(out)[-1] == _ck(out, 4)
    assert not os.path.exists(_ck(out, 3))  # save_every=2 kept
    os.remove(os.path.join(out, "config.json"))  # gone: the newest checkpoint's config is the starting point
    _run([f"--out_dir={out}", "--resume", "--epochs=5"])
    assert json.load(open(os.path.join(out, "config.json")))["prompts_per_epoch"] == 1


def test_another_lora_rank_is_refused_in_one_line_even_with_allow_config_change(tmp_path, two_epochs):
    err = _run([f"--out_dir={two_epochs}", "--resume", "--epochs=3", "--allow_config_change=True",
                "--lora_rank=8"], ok=False).stderr
    assert "lora_rank 4 → 8" in err and "other shapes" in err and len(err.strip().splitlines()) == 1
    # and the weights themselves, read by a model of another rank (sample.py's path), are refused too
    import model as M
    gen = M.build_generator(tiny_cfg(ADV_PRESET, lora_rank=8), torch.device("cpu"))
    with pytest.raises(SystemExit, match=r"its weights do not fit this run's model: .* is \[4, "):
        C.load_weights(gen, _ck(two_epochs, 2))


# --- damaged checkpoints and metrics ----------------------------------------------------------

def _tensors_edit(name, edit):
    def damage(ck):
        path = os.path.join(ck, name)
        w = load_file(path)
        edit(w)
        save_file(w, path)
    return damage


def _state_edit(edit):
    def damage(ck):
        state = torch.load(os.path.join(ck, "state.pt"), weights_only=True)
        edit(state)
        torch.save(state, os.path.join(ck, "state.pt"))
    return damage


_state_without_optimizer = _state_edit(lambda s: s.pop("optimizer"))


def _manifest_entry_not_an_object(ck):
    manifest = json.load(open(os.path.join(ck, C.MANIFEST)))
    manifest["state.pt"] = 3
    json.dump(manifest, open(os.path.join(ck, C.MANIFEST), "w"))


def _first(w):
    return sorted(w)[0]


DAMAGE = {  # (damage a checkpoint, re-hash its manifest?, what the warning says)
    "manifest_list": (lambda ck: open(os.path.join(ck, C.MANIFEST), "w").write("[]"), False,
                      "manifest.json is not a map of file name"),
    "manifest_entry": (_manifest_entry_not_an_object, False, "manifest.json is not a map of file name"),
    "state_keys": (_state_without_optimizer, True, "state.pt lacks 'optimizer'"),
    "wrong_shape": (_tensors_edit("trainable.safetensors", lambda w: w.update({_first(w): torch.zeros(3)})),
                    True, "trainable.safetensors and ema.safetensors hold different tensors"),
    "zero_bytes": (lambda ck: open(os.path.join(ck, "trainable.safetensors"), "wb").close(), True,
                   "trainable.safetensors is not a readable safetensors file"),
    "nan": (_tensors_edit("trainable.safetensors", lambda w: w[_first(w)].view(-1).fill_(float("nan"))),
            True, "trainable.safetensors holds NaN or inf"),
    # it resumed at epoch 1 on epoch 2's weights; a TypeError at the first step; float16 without a word
    "epoch_of_another": (_state_edit(lambda s: s.update(epoch=1)), True, "state.pt says 1 epochs done, its "
                                                                         "folder 2"),
    "counter_type": (_state_edit(lambda s: s["counters"].update(g_steps="x")), True,
                     "state.pt's counter 'g_steps' is 'x', not a count"),
    "float16": (_tensors_edit("ema.safetensors", lambda w: w.update({k: v.half() for k, v in w.items()})),
                True, "ema.safetensors holds torch.float16 tensors"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_one_line_and_resume_takes_the_one_before(tmp_path, two_epochs, case):
    out = str(tmp_path / "run")
    shutil.copytree(two_epochs, out)
    damage, rehash, why = DAMAGE[case]
    damage(_ck(out, 2))
    if rehash:
        _rehash(_ck(out, 2))
        assert C.verify(_ck(out, 2)) is None  # the checksums match: only reading it shows the damage
    p = _run([f"--out_dir={out}", "--resume", "--epochs=2"])
    assert f"WARNING skipping damaged checkpoint {_ck(out, 2)}: {why}" in p.stdout
    assert f"resumed from {_ck(out, 1)} (1 epochs done; next: epoch 2/2)" in p.stdout
    assert C.damaged(_ck(out, 2)) is None  # epoch 1 was trained again and saved in its place
    if case != "manifest_list" and case != "manifest_entry":  # loading it directly: the same line
        damage(_ck(out, 2))
        with pytest.raises(SystemExit, match=why.split(" (")[0]):
            C.load(_ck(out, 2), *_built_run())


def test_saving_a_checkpoint_again_or_pruning_never_deletes_a_users_file(tmp_path, two_epochs):
    """A user's file inside checkpoints/epoch_N/ survives that checkpoint being saved again (a resume from
    an older one) and pruning (keep_last): a checkpoint folder holding it is not pruned."""
    out = str(tmp_path / "run")
    shutil.copytree(two_epochs, out)
    for n in (1, 2):
        with open(os.path.join(_ck(out, n), "mine.txt"), "w") as f:
            f.write(f"notes on epoch {n}")
    with open(os.path.join(_ck(out, 2), "trainable.safetensors"), "ab") as f:
        f.write(b"x")                                       # damaged: the resume starts from epoch 1
    p = _run([f"--out_dir={out}", "--resume", "--epochs=3", "--keep_last=1"])
    assert f"resumed from {_ck(out, 1)}" in p.stdout
    for n in (1, 2):
        assert open(os.path.join(_ck(out, n), "mine.txt")).read() == f"notes on epoch {n}"
    assert C.verify(_ck(out, 2)) is None and C.verify(_ck(out, 3)) is None   # epoch 2 saved anew, 3 written


def test_a_full_disk_while_writing_the_final_report_is_one_line(tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(E, "plot_curves", full)
    out = str(tmp_path / "run")
    p = _run([f"--out_dir={out}", "--epochs=1", "--eval_every=1"], ok=False)
    assert "disk full while writing" in p.stderr and "curves.png and summary.json" in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_a_full_disk_while_writing_the_held_out_grid_is_one_line(tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(E, "save_grid", full)
    p = _run([f"--out_dir={tmp_path / 'run'}", "--epochs=1", "--eval_every=1"], ok=False)
    assert p.stderr.strip().startswith("disk full while writing") and "samples" in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_a_resume_reads_its_checkpoint_once(tmp_path, two_epochs, monkeypatch):
    """latest() reads the checkpoint whole to check it; load() takes that copy instead of reading it again."""
    out = str(tmp_path / "run")
    shutil.copytree(two_epochs, out)
    reads, read = [], C.read
    monkeypatch.setattr(C, "read", lambda path, *a, **k: reads.append(path) or read(path, *a, **k))
    _run([f"--out_dir={out}", "--resume", "--epochs=3", "--eval_every=0"])
    assert reads.count(_ck(out, 2)) == 1, reads


def _built_run():
    import model as M
    import reward as R
    cfg = tiny_cfg(ADV_PRESET)
    gen = M.build_generator(cfg, torch.device("cpu"))
    return gen, R.build_adversary(cfg, torch.device("cpu")), dict(g_epochs=0, g_steps=0, d_steps=0), cfg


def test_metrics_lines_that_are_not_objects_are_dropped_and_a_folder_in_its_place_refused(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 0, "reward_mean": 1}\n[1, 2]\n3\n"text"\n{"epoch": 1}\n{"epoch": "x"}\n')
    assert E.read_metrics(str(path)) == [{"epoch": 0, "reward_mean": 1}, {"epoch": 1}, {"epoch": "x"}]
    assert f"{path}:2: dropped a line that is not a JSON object" in capsys.readouterr().out
    O.open_metrics(str(tmp_path), 1).write({"epoch": 1})  # on resume: the rows of epochs before 1, then this
    assert [json.loads(line) for line in open(path)] == [{"epoch": 0, "reward_mean": 1}, {"epoch": 1}]
    # a line that is not UTF-8 (bytes replaced it would pass for epoch 1 again) and a repeated epoch: gone
    path.write_bytes(b'{"epoch": 0}\n{"epoch": 1}\n{"epoch": 2}\n{"epoch": 1, "x": "\xff"}\n{"epoch": 1}\n')
    O.open_metrics(str(tmp_path), 3).write({"epoch": 3})
    assert [json.loads(line)["epoch"] for line in open(path)] == [0, 1, 2, 3]
    assert f"{path}:4: dropped a line that is not UTF-8 text" in capsys.readouterr().out
    os.remove(path)
    os.makedirs(path)
    with pytest.raises(SystemExit, match="metrics.jsonl is a folder, not a run's metrics file"):
        E.read_metrics(str(path))
    with pytest.raises(SystemExit, match=r"metrics.jsonl is a folder, where a run keeps its metrics.jsonl"):
        O.claim_out_dir(configurator.Config(out_dir=str(tmp_path), resume=True))


# --- --overwrite deletes only what a run of ours wrote ------------------------------------------

def test_overwrite_removes_only_the_files_of_our_run(tmp_path):
    out = tmp_path / "run"
    _run([f"--out_dir={out}", "--epochs=1"])
    mine = ["samples/my_drawing.png", "checkpoints/README_mine.txt", "checkpoints/my_other_model/weights.bin",
            "tensorboard/other_tool.log", "notes.txt"]
    ours = ["samples/epoch_000000.png", "tensorboard/events.out.tfevents.1.host", "summary.json",
            "curves.png", "checkpoints/epoch_000003.tmp/state.pt"]
    for name in mine + ours:
        os.makedirs((out / name).parent, exist_ok=True)
        (out / name).write_text("x")
    old = C.checkpoints(str(out))
    assert O.our_run(str(out)) and set(map(str, (out / n for n in ours))) <= set(O.our_files(str(out)))
    _run([f"--out_dir={out}", "--epochs=1", "--overwrite=True"])
    assert all((out / n).read_text() == "x" for n in mine)                  # the user's: all kept
    assert not any((out / n).exists() for n in ours)                        # ours: gone
    assert not (out / "checkpoints" / "epoch_000003.tmp").exists()          # its folder, left empty, too
    assert C.checkpoints(str(out)) == old and C.verify(old[0]) is None      # the new run's checkpoint


def test_overwrite_is_refused_on_a_folder_that_holds_no_run_of_ours(tmp_path):
    out = tmp_path / "theirs"
    for name, text in [("config.json", '{"model": "resnet50", "lr": 0.1}'), ("samples/photo1.png", "x"),
                       ("checkpoints/resnet50.pt", "x")]:
        os.makedirs((out / name).parent, exist_ok=True)
        (out / name).write_text(text)
    err = _run([f"--out_dir={out}", "--epochs=1", "--overwrite=True"], ok=False).stderr
    assert "holds no run of this project" in err and "nothing was deleted" in err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == \
           ["checkpoints/resnet50.pt", "config.json", "samples/photo1.png"]   # and no .lock of ours


@pytest.mark.parametrize("out_dir, cwd, msg", [("", ".", "out_dir is empty"), (".", ".", "which holds"),
                                               ("..", "a/b", "which holds"), (ROOT, ".", "which holds")])
def test_an_out_dir_that_holds_the_working_directory_or_the_code_is_refused(tmp_path, out_dir, cwd, msg):
    here = tmp_path / cwd
    here.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(here)
        with pytest.raises(SystemExit, match=msg):
            O.claim_out_dir(configurator.Config(out_dir=out_dir, overwrite=True))
    assert not any(p.name == ".lock" for p in tmp_path.rglob("*")) and not os.path.exists(
        os.path.join(ROOT, ".lock"))


# --- a full disk --------------------------------------------------------------------------------

def test_a_full_disk_while_saving_or_logging_is_one_line_and_leaves_no_tmp(tmp_path, monkeypatch):
    gen, adversary, counters, cfg = _built_run()
    cfg.out_dir = str(tmp_path)
    counters["bad_updates"] = 0
    first = C.save(cfg, 1, gen, adversary, counters)
    real_save = torch.save

    def full_torch_save(obj, f, *a, **k):  # what torch.save says when the disk fills mid-write
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4352 vs 4240")
    monkeypatch.setattr(C.torch, "save", full_torch_save)
    with pytest.raises(SystemExit) as e:
        C.save(cfg, 2, gen, adversary, counters)
    tmp = _ck(str(tmp_path), 2) + ".tmp"
    assert str(e.value) == (f"disk full while writing {tmp}/state.pt; the last intact checkpoint is {first}; "
                            f"{tmp} was removed")
    monkeypatch.setattr(C.torch, "save", real_save)

    def full_save_file(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(C, "save_file", full_save_file)
    with pytest.raises(SystemExit, match=f"disk full while writing {tmp}/trainable.safetensors; the last "
                                         f"intact checkpoint is {first}"):
        C.save(cfg, 2, gen, adversary, counters)
    assert C.checkpoints(str(tmp_path)) == [first] and os.listdir(os.path.join(tmp_path, "checkpoints")) == \
           ["epoch_000001"] and C.verify(first) is None

    class FullFile:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")
    log = O.open_metrics(str(tmp_path), 0)
    log.file = FullFile()
    with pytest.raises(SystemExit) as e:
        log.write({"epoch": 0})
    assert str(e.value) == (f"disk full while writing {tmp_path}/metrics.jsonl; the last intact checkpoint "
                            f"is {first}")


def test_a_checkpoint_pruned_while_an_evaluation_reads_it_is_replaced_by_the_newest(tmp_path, two_epochs,
                                                                                    capsys):
    out = str(tmp_path / "run")
    shutil.copytree(two_epochs, out)
    gen = _built_run()[0]
    shutil.rmtree(_ck(out, 1))  # the live run pruned it after sample.py chose it
    assert C.load_weights(gen, _ck(out, 1)) == _ck(out, 2)
    assert f"WARNING {_ck(out, 1)} was removed while it was being read" in capsys.readouterr().out
    ema = load_file(os.path.join(_ck(out, 2), "ema.safetensors"))
    assert all(torch.equal(gen.ema.shadow[k], ema[k]) for k in ema)
    shutil.rmtree(os.path.join(out, "checkpoints"))
    os.makedirs(os.path.join(out, "checkpoints"))
    with pytest.raises(SystemExit, match="was removed while it was being read .* no intact checkpoint left"):
        C.load_weights(gen, _ck(out, 2))


# --- the end of a run ------------------------------------------------------------------------

EVAL = ["--epochs=2", "--save_every=1", "--eval_every=1", "--eval_num_steps=2",
        "--test_prompts=assets/tiny_prompts.txt"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("straight") / "run")
    _run([f"--out_dir={out}", *EVAL])
    return out


def _final(out):
    rows = E.read_metrics(os.path.join(out, "metrics.jsonl"))
    return {k: v for k, v in rows[-1].items() if k.startswith("eval/") or k == "epoch"}


@pytest.mark.parametrize("how", ["sigterm_in_last_epoch", "kill_in_final_evaluation"])
def test_the_final_report_survives_an_end_interrupted_and_a_finished_run_says_so(tmp_path, straight, how,
                                                                                  monkeypatch):
    out = str(tmp_path / "run")
    window, evaluate = T.window_for_epoch, E.evaluate

    class Killed(Exception):
        pass

    def sigterm_in_last_epoch(cfg, epoch):
        if epoch == cfg.epochs - 1:
            os.kill(os.getpid(), signal.SIGTERM)  # train's handler: finish the epoch, save, stop
        return window(cfg, epoch)

    def killed_in_final_evaluation(cfg, gen, *a, **k):
        if a[-2] == cfg.epochs:  # evaluate(cfg, gen, phi, references, test_prompts, epoch, history)
            raise Killed
        return evaluate(cfg, gen, *a, **k)
    if how == "sigterm_in_last_epoch":
        monkeypatch.setattr(T, "window_for_epoch", sigterm_in_last_epoch)
        assert "SIGTERM: saved epoch_000002" in _run([f"--out_dir={out}", *EVAL]).stdout
    else:
        monkeypatch.setattr(E, "evaluate", killed_in_final_evaluation)
        with pytest.raises(Killed):
            _run([f"--out_dir={out}", *EVAL])
    monkeypatch.undo()
    assert not os.path.exists(os.path.join(out, "summary.json")) and C.checkpoints(out)[-1] == _ck(out, 2)
    _run([f"--out_dir={out}", "--resume"])                                 # the run's own epochs = 2
    summary = [json.load(open(os.path.join(d, "summary.json"))) for d in (out, straight)]
    assert summary[0] == summary[1] and "train_reward" in summary[0]
    assert _final(out) == _final(straight) and os.path.isfile(os.path.join(out, "curves.png"))
    rows = open(os.path.join(out, "metrics.jsonl")).read()
    p = _run([f"--out_dir={out}", "--resume"])
    assert p.returncode == 0 and "is finished (2 epochs done, epochs = 2, final report written)" in p.stdout
    assert open(os.path.join(out, "metrics.jsonl")).read() == rows


def test_a_late_refusal_writes_nothing_that_blocks_the_corrected_rerun(tmp_path):
    out = tmp_path / "run"
    err = _run([f"--out_dir={out}", "--epochs=1", "--log_to=foo"], ok=False).stderr
    assert "log_to" in err and not (out / "config.json").exists() and not (out / "metrics.jsonl").exists()
    _run([f"--out_dir={out}", "--epochs=1"])
    assert C.checkpoints(str(out)) == [_ck(str(out), 1)]


def test_a_resume_takes_the_evaluation_already_written_instead_of_redoing_it(tmp_path, monkeypatch):
    """Killed after the final evaluation's row but before its report: --resume writes the report from that
    row (the same weights and seeds would give the same numbers) without generating the held-out set again;
    likewise the evaluation of the checkpoint an interrupted run resumes from."""
    out = str(tmp_path / "run")
    _run([f"--out_dir={out}", "--epochs=2", "--save_every=1", "--eval_every=1"])
    before = [r for r in E.read_metrics(os.path.join(out, "metrics.jsonl")) if r["epoch"] == 2]
    assert before and any(k.startswith("eval/") for k in before[0])
    os.remove(os.path.join(out, "curves.png"))  # the kill came before the report
    monkeypatch.setattr(E, "generate", lambda *a, **k: pytest.fail("the written evaluation was redone"))
    p = _run([f"--out_dir={out}", "--resume"])
    assert "as written before the resume" in p.stdout and os.path.isfile(os.path.join(out, "curves.png"))
    after = [r for r in E.read_metrics(os.path.join(out, "metrics.jsonl")) if r["epoch"] == 2]
    assert after == before
    monkeypatch.undo()
    os.remove(os.path.join(out, "curves.png"))  # again, an evaluation setting changed: evaluated again
    p = _run([f"--out_dir={out}", "--resume", "--eval_num_steps=3"])
    assert "as written before the resume" not in p.stdout and "eval @ epoch 2: dino_sim" in p.stdout
    shutil.rmtree(_ck(out, 2))  # an interrupted run: resumed from epoch 1, evaluated with 40 steps then
    p = _run([f"--out_dir={out}", "--resume", "--eval_num_steps=40"])
    assert p.stdout.count("as written before the resume") == 1, p.stdout
    shutil.rmtree(_ck(out, 2))  # and once more with 3 steps (the config.json now says 40): evaluated again
    p = _run([f"--out_dir={out}", "--resume", "--eval_num_steps=3"])
    assert "as written before the resume" not in p.stdout, p.stdout
