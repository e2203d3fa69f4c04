"""sample.py's evaluations: each in its own folder, never overwritten, reproducible in plain diffusers; the
released LoRAs (PEFT folders) load for training and evaluation; its inputs refused before any image."""
import json
import os
import re
import runpy
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import eval as E
import checkpoint as C
import model as M
from inproc import run_main
from test_train import PRESET, tiny_cfg

TINY = ["--pretrained", "random:tiny", "--resolution", "32", "--max_sequence_length", "8", "--t5=False",
        "--mixed_precision", "no"]  # config/tiny_random.py's model, for --pretrained


def _sample(args, ok=True):
    return run_main("sample.py", args, ok)


def _pngs(folder):
    names = sorted(n for n in os.listdir(folder) if n[:4].isdigit() and n.endswith(".png"))
    return names, np.stack([np.asarray(Image.open(os.path.join(folder, n)), dtype=np.int16) for n in names])


def _reproduce(script, out):
    """Run a written reproduce.py as `python reproduce.py out` would (in this process: no torch import)."""
    argv = sys.argv
    sys.argv = [str(script), str(out)]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv


def peft_adapter(folder, rank=4, alpha=8, targets=M.LORA_TARGETS):
    """A LoRA saved by peft's own save_pretrained on the tiny random SD3 transformer (as the released
    Adv-GRPO / Flow-GRPO LoRAs were): random A and B, so it changes the images."""
    from peft import LoraConfig, get_peft_model
    transformer = M.random_pipeline("tiny").transformer
    torch.manual_seed(1)
    peft_model = get_peft_model(transformer, LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False,
                                                        target_modules=list(targets)))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.mul_(20)  # large enough to move a random model's images visibly
    peft_model.save_pretrained(str(folder))
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A one-epoch tiny run whose EMA LoRA moved (ema_every=1, a large lr), evaluated 3 steps per image."""
    out = tmp_path_factory.mktemp("evals") / "run"
    run_main("train.py", [PRESET, f"--out_dir={out}", "--epochs=1", "--ema_every=1", "--lr=3e-2",
                          "--eval_num_steps=3"])
    return out


# --- PEFT adapters (the released LoRAs) -------------------------------------------------------------

def test_init_lora_takes_a_peft_folder_and_refuses_other_settings(tmp_path):
    from peft.utils import get_peft_model_state_dict
    saved = peft_adapter(tmp_path / "peft")
    assert all(k.startswith("base_model.model.") for k in saved)  # peft's own key names
    gen = M.build_generator(tiny_cfg(init_lora=str(tmp_path / "peft")), torch.device("cpu"))  # r 4 / α 8
    loaded = get_peft_model_state_dict(gen.transformer)
    assert {f"base_model.model.{k}" for k in loaded} == set(saved)
    assert all(torch.equal(v, saved[f"base_model.model.{k}"]) for k, v in loaded.items())
    assert all(torch.equal(gen.ema.shadow[n], p) for n, p in gen.params.items())  # the EMA starts there too
    transformer = M.add_lora(M.random_pipeline("tiny").transformer, 4, 8)
    peft_adapter(tmp_path / "r8", rank=8, alpha=16)
    with pytest.raises(SystemExit, match=r"rank 8 / alpha 16: set --lora_rank=8 --lora_alpha=16$"):
        M.load_lora(transformer, str(tmp_path / "r8"))
    peft_adapter(tmp_path / "q_only", targets=("attn.to_q",))  # a run that did not adopt it: one line
    with pytest.raises(SystemExit,
                       match=r"adapts \['attn.to_q'\], this run \['attn.add_k_proj'.*--lora_targets"):
        M.load_lora(transformer, str(tmp_path / "q_only"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="neither pytorch_lora_weights.safetensors .* nor adapter_config"):
        M.load_lora(transformer, str(tmp_path / "empty"))
    (tmp_path / "r8" / "adapter_model.safetensors").write_bytes(b"junk")
    with pytest.raises(SystemExit, match=r"r8/adapter_model.safetensors cannot be read"):
        M.load_lora(transformer, str(tmp_path / "r8"))


def test_a_lora_of_the_wrong_kind_or_with_nan_weights_is_refused_in_one_line(tmp_path):
    """A NaN weight would sample black images and score them with exit 0; a rank "4", 1.5 or an alpha 0
    (once taken as the rank) or target_modules 5 are not a LoRA's settings; each is one line naming the
    folder."""
    import json
    from safetensors.torch import save_file
    transformer = M.add_lora(M.random_pipeline("tiny").transformer, 4, 8)
    saved = peft_adapter(tmp_path / "nan")
    save_file({k: v.fill_(float("nan")) if i == 0 else v for i, (k, v) in enumerate(saved.items())},
              str(tmp_path / "nan" / "adapter_model.safetensors"))
    with pytest.raises(SystemExit, match=r"nan/adapter_model.safetensors: non-finite weights in 1 tensors"):
        M.load_lora(transformer, str(tmp_path / "nan"))
    for name, change in (("r_str", {"r": "4"}), ("r_float", {"r": 1.5}), ("alpha0", {"lora_alpha": 0}),
                         ("targets", {"target_modules": 5})):
        peft_adapter(tmp_path / name)
        config = json.loads((tmp_path / name / "adapter_config.json").read_text())
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({**config, **change}))
        for call in (M.load_lora, M.lora_settings):
            with pytest.raises(SystemExit, match=rf"{name}: r .* must be a positive integer"):
                call(transformer, str(tmp_path / name)) if call is M.load_lora else call(str(tmp_path / name))


def test_sample_evaluates_a_base_plus_a_peft_lora_as_peft_applies_it(tmp_path):
    """--pretrained … --lora DIR: the images are those of the base with the adapter applied by peft itself
    (PeftModel.from_pretrained, as Flow-GRPO loads its lora_path), under sample.py's per-image noise; and
    the reproduce.py written beside them makes the same PNGs."""
    from peft import PeftModel
    peft_adapter(tmp_path / "peft")
    prompts = ["a red circle on the left", "a blue square"]
    steps = ["--prompt", *prompts, "--n_per_prompt", "2", "--num_steps", "3", "--guidance_scale", "2.0"]
    _sample([*TINY, "--lora", str(tmp_path / "peft"), *steps, "--out", str(tmp_path / "ev")])
    _sample([*TINY, *steps, "--out", str(tmp_path / "base")])  # the base alone
    m = json.load(open(tmp_path / "ev" / "metrics.json"))
    assert m["lora"] == str(tmp_path / "peft") and m["prompts"] == [p for p in prompts for _ in range(2)]
    names, ours = _pngs(tmp_path / "ev")
    assert names == ["0000.png", "0001.png", "0002.png", "0003.png"]
    assert np.abs(ours - _pngs(tmp_path / "base")[1]).max() > 20  # the adapter changes the images

    pipe = M.random_pipeline("tiny")
    pipe.transformer = PeftModel.from_pretrained(pipe.transformer, str(tmp_path / "peft"))
    theirs = np.stack([np.asarray(pipe(p, generator=torch.Generator().manual_seed(i), num_inference_steps=3,
                                       guidance_scale=2.0, max_sequence_length=8, height=32, width=32,
                                       output_type="np").images[0] * 255).round()
                       for i, p in enumerate(m["prompts"])])
    assert np.abs(ours - theirs).max() <= 1  # uint8 rounding
    _reproduce(tmp_path / "ev" / "reproduce.py", tmp_path / "again")
    assert np.abs(_pngs(tmp_path / "again")[1] - ours).max() <= 1


def test_a_lora_on_a_subset_of_the_targets_evaluates_and_starts_a_run(tmp_path, capsys):
    """A PEFT LoRA on to_q/to_k/to_v/to_out.0 (a common choice): sample.py evaluates it as peft applies it,
    --init_lora starts from it (its rank, alpha and targets, said); a target the model lacks is one line."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    qkvo = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
    saved = peft_adapter(tmp_path / "qkvo", rank=8, alpha=8, targets=qkvo)
    _sample([*TINY, "--lora", str(tmp_path / "qkvo"), "--prompt", "a cat", "--num_steps", "3",
             "--out", str(tmp_path / "ev")])
    pipe = M.random_pipeline("tiny")
    pipe.transformer = PeftModel.from_pretrained(pipe.transformer, str(tmp_path / "qkvo"))
    theirs = (np.asarray(pipe("a cat", generator=torch.Generator().manual_seed(0), num_inference_steps=3,
                              guidance_scale=4.5, max_sequence_length=8, height=32, width=32,
                              output_type="np").images[0]) * 255).round()
    assert np.abs(_pngs(tmp_path / "ev")[1][0] - theirs).max() <= 1
    cfg = tiny_cfg(init_lora=str(tmp_path / "qkvo"))
    M.adopt_lora(cfg)
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets) == (8, 8, sorted(qkvo))
    assert "its rank 8, alpha 8, targets" in capsys.readouterr().out
    gen = M.build_generator(cfg, torch.device("cpu"))
    loaded = get_peft_model_state_dict(gen.transformer)
    assert {f"base_model.model.{k}" for k in loaded} == set(saved)
    with pytest.raises(SystemExit, match=r"LoRA targets \['attn.to_nothing'\]: .*not found"):
        M.build_generator(tiny_cfg(lora_targets=["attn.to_nothing"]), torch.device("cpu"))


# --- each evaluation in its own folder, reproducible --------------------------------------------------

def test_evaluations_get_their_own_folders_and_are_never_overwritten(run_dir, monkeypatch):
    _sample(["--ckpt", str(run_dir)])  # as the run evaluated itself: eval/epoch_000001
    own = run_dir / "eval" / "epoch_000001"
    names, first = _pngs(own)
    assert len(names) == 4 and json.load(open(own / "metrics.json"))["num_steps"] == 3
    _sample(["--ckpt", str(run_dir), "--prompt", "a red circle on the left", "--n_per_prompt", "2"])
    _sample(["--ckpt", str(run_dir), "--num_steps", "2"])
    others = sorted(n for n in os.listdir(run_dir / "eval") if n != "epoch_000001")
    assert len(others) == 2 and all(n.startswith("epoch_000001-") and len(n) == 21 for n in others)
    assert {len(_pngs(run_dir / "eval" / n)[0]) for n in others} == {2, 4}
    assert np.array_equal(_pngs(own)[1], first)  # the first evaluation is untouched
    err = _sample(["--ckpt", str(run_dir)], ok=False).stderr
    assert "already holds an evaluation (0000.png, 0001.png, 0002.png …): --overwrite to replace it" in err
    # --overwrite into the same folder with fewer images: no stale PNG of the earlier one is left
    (own / "my_notes.txt").write_text("mine")
    _sample(["--ckpt", str(run_dir), "--prompt", "a red circle on the left", "--n_per_prompt", "1",
             "--out", str(own), "--overwrite"])
    assert _pngs(own)[0] == ["0000.png"] and (own / "my_notes.txt").read_text() == "mine"
    assert json.load(open(own / "metrics.json"))["prompts"] == ["a red circle on the left"]
    # --overwrite that fails half-way (a full disk at the grid): the earlier evaluation is kept whole
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(E, "save_grid", full)
    err = _sample(["--ckpt", str(run_dir), "--prompt", "a blue square at the top", "--n_per_prompt", "2",
                   "--out", str(own), "--overwrite"], ok=False).stderr
    assert err.strip().endswith("an earlier one there is kept") and _pngs(own)[0] == ["0000.png"]
    assert sorted(os.listdir(own)) == ["0000.png", "grid.png", "lora", "metrics.json", "my_notes.txt",
                                       "reproduce.json", "reproduce.py"]


def test_reproduce_py_makes_the_evaluations_images_in_plain_diffusers(run_dir, tmp_path):
    """...even after the folder is moved (under a hostile name) and the run's checkpoint pruned."""
    out, run = tmp_path / "ev", tmp_path / "run"
    shutil.copytree(run_dir, run)
    _sample(["--ckpt", str(run / "checkpoints" / "epoch_000001"), "--out", str(out), "--seed", "3"])
    text, settings = (out / "reproduce.py").read_text(), json.load(open(out / "reproduce.json"))
    assert "load_lora_weights(LORA" in text and 'manual_seed(S["seed"] * 1_000_003 + i)' in text
    assert [settings[k] for k in ("n_per_prompt", "seed", "num_steps", "guidance_scale")] == [1, 3, 3, 4.5]
    keys = ("max_sequence_length", "resolution", "t5", "dtype")
    assert [settings[k] for k in keys] == [8, 32, False, "float32"]
    moved = tmp_path / 'a "folder" \\ with """ quotes'   # moved, and its checkpoint pruned: it still works
    shutil.move(str(out), str(moved))
    shutil.rmtree(run / "checkpoints")
    _reproduce(moved / "reproduce.py", tmp_path / "again")
    out = moved
    names, ours = _pngs(out)
    assert _pngs(tmp_path / "again")[0] == names and len(names) == 4
    assert np.abs(_pngs(tmp_path / "again")[1] - ours).max() <= 1   # uint8 rounding
    base = tiny_cfg()  # the LoRA matters: the base model's images differ
    gen = M.build_generator(base, torch.device("cpu"))
    plain = E.generate(gen, json.load(open(out / "metrics.json"))["prompts"], 3, 3, 4.5)
    assert np.abs((plain.permute(0, 2, 3, 1).numpy() * 255).round() - ours).max() > 5


# --- inputs refused in one line, before any image -----------------------------------------------------

@pytest.mark.parametrize("args, msg", [
    (["--num_steps", "0"], "--num_steps must be ≥ 1, got 0"),
    (["--guidance_scale", "-1"], "--guidance_scale must be ≥ 0, got -1"),
    (["--out", "/proc/nope/ev"], "--out /proc/nope/ev cannot be written"),
    (["--out", "FILE/ev"], "cannot be written: Not a directory"),
])
def test_bad_values_and_a_bad_out_fail_before_any_image(run_dir, tmp_path, monkeypatch, args, msg):
    (tmp_path / "FILE").write_text("")
    args = [str(tmp_path / a) if a.startswith("FILE") else a for a in args]
    monkeypatch.setattr(E, "generate", lambda *a, **k: pytest.fail("an image was generated"))
    err = _sample(["--ckpt", str(run_dir), *args], ok=False).stderr
    assert msg.replace("FILE", str(tmp_path / "FILE")) in err and err.count("\n") == 1, err


def test_guidance_scale_zero_is_used_not_replaced(run_dir, tmp_path):
    """0 ≤ g ≤ 1 is no classifier-free guidance (diffusers' rule): the images of g = 1, recorded as given."""
    for g in ("0", "1"):
        _sample(["--ckpt", str(run_dir), "--guidance_scale", g, "--out", str(tmp_path / g)])
    assert json.load(open(tmp_path / "0" / "metrics.json"))["guidance_scale"] == 0
    assert np.array_equal(_pngs(tmp_path / "0")[1], _pngs(tmp_path / "1")[1])
    assert json.load(open(tmp_path / "0" / "reproduce.json"))["guidance_scale"] == 0


# --- --summarize / --compare ------------------------------------------------------------------------

def _summary_run(folder, lr=1e-3, before=0.5, after=0.6):
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps({"toy_geneval": {"before": before, "after": after},
                                                     "epochs": {"before": 0, "after": 4}}))
    (folder / "config.json").write_text(json.dumps({"lr": lr, "seed": int(after * 10), "epochs": 4,
                                                    "out_dir": str(folder)}))


def test_summarize_warns_when_runs_differ_and_names_a_damaged_summary(tmp_path):
    _summary_run(tmp_path / "a")
    _summary_run(tmp_path / "b", after=0.8)
    p = _sample(["--summarize", str(tmp_path / "a"), str(tmp_path / "b")])
    assert "WARNING" not in p.stdout and "0.700 ± 0.100" in p.stdout  # seeds and out_dir may differ
    assert "(n=2, ± population std)" in p.stdout
    _summary_run(tmp_path / "c", lr=1e-4)
    p = _sample(["--summarize", str(tmp_path / "a"), str(tmp_path / "c")])
    assert "WARNING --summarize averages runs whose configs differ in lr\n" in p.stdout
    for damage in (b'{"toy_geneval": {"before": 0.5, "aft', b"\xff\xfe{", b"[1, 2]"):
        (tmp_path / "c" / "summary.json").write_bytes(damage)
        for flag in ("--summarize", "--compare"):
            err = _sample([flag, str(tmp_path / "a"), str(tmp_path / "c")], ok=False).stderr
            assert f"{flag}: {tmp_path / 'c' / 'summary.json'} is damaged" in err and err.count("\n") == 1


def test_compare_and_summarize_answer_before_torch_loads(tmp_path):
    """Tables of finished runs read JSON files: they answer in a fraction of a second, as --help does,
    without the ~7 s of importing torch."""
    import subprocess
    _summary_run(tmp_path / "a")
    _summary_run(tmp_path / "b", after=0.8)
    (tmp_path / "a" / "metrics.jsonl").write_bytes(b'{"epoch": 0, "eval/toy_geneval": 0.5}\n{"epo\n\xff\n')
    for flag, says in (("--summarize", "0.700 ± 0.100"), ("--compare", "0.500 (epoch 0)")):
        argv = ["sample.py", flag, str(tmp_path / "a"), str(tmp_path / "b")]
        code = (f"import runpy, sys\nsys.argv = {argv!r}\ntry:\n    runpy.run_path('sample.py', "
                "run_name='__main__')\nexcept SystemExit as e:\n    print('exit', e.code)\n"
                "print('torch loaded:', 'torch' in sys.modules)")
        out = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(E.__file__),
                             capture_output=True, text=True, timeout=120).stdout
        assert says in out and "exit 0" in out and out.strip().endswith("torch loaded: False"), out


def test_compare_shows_the_best_on_the_way_and_when_the_monitor_fired(tmp_path):
    """A fixed reward that helped first and was hacked later ends above its base but below its own best:
    --compare prints the best held-out value with its epoch, and the epochs the monitor flagged."""
    for name, toy, fd, flagged in (("adv", (0.3, 0.6, 0.7), (12.0, 3.0, 2.5), ()),
                                   ("frozen", (0.3, 0.8, 0.6), (12.0, 1.7, 14.4), (10,))):
        _summary_run(tmp_path / name, before=toy[0], after=toy[-1])
        rows = [{"epoch": 5 * i, "eval/toy_geneval": t, "eval/fd_dino": f, **({"hacking_warning": 1}
                 if 5 * i in flagged else {})} for i, (t, f) in enumerate(zip(toy, fd))]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = _sample(["--compare", str(tmp_path / "adv"), str(tmp_path / "frozen")]).stdout
    assert re.search(r"toy_geneval best on the way +0\.700 \(epoch 10\) +0\.800 \(epoch 5\)\n", out), out
    assert re.search(r"fd_dino best on the way +2\.500 \(epoch 10\) +1\.700 \(epoch 5\)\n", out), out
    assert re.search(r"reward-hacking monitor +quiet +FLAGGED at 10\n", out), out
    for seed in ("s0", "s1"):  # two runs of one name in different folders: told apart by their parents
        (tmp_path / seed).mkdir()
        _summary_run(tmp_path / seed / "adversarial")
    out = _sample(["--compare", tmp_path / "s0" / "adversarial", tmp_path / "s1" / "adversarial"]).stdout
    assert re.search(r"training\) +s0/adversarial +s1/adversarial\n", out), out


def test_reproduce_py_of_a_pipeline_folder_loads_it_with_from_pretrained(tmp_path):
    """The tiny world's base (a diffusers folder; its 1-token text length from sample_settings.json)."""
    _sample(["--pretrained", "assets/tinyworld/pipeline_early", "--resolution", "32", "--t5=False",
             "--mixed_precision", "no", "--prompt", "a red circle on the left", "a blue square at the top",
             "--n_per_prompt", "2", "--num_steps", "6", "--guidance_scale", "3.0",
             "--out", str(tmp_path / "ev")])
    text = (tmp_path / "ev" / "reproduce.py").read_text()
    settings = json.load(open(tmp_path / "ev" / "reproduce.json"))
    assert "StableDiffusion3Pipeline.from_pretrained(" in text and settings["lora"] is None
    assert [settings[k] for k in ("max_sequence_length", "resolution", "t5")] == [1, 32, False]
    _reproduce(tmp_path / "ev" / "reproduce.py", tmp_path / "again")
    assert np.abs(_pngs(tmp_path / "again")[1] - _pngs(tmp_path / "ev")[1]).max() <= 1


def test_sample_takes_what_its_dino_metrics_depend_on_and_leaves_nothing_when_it_fails(tmp_path):
    """--references / --dino_backbone are the evaluation's (never data/refs/ and DINOv2-B by chance); a
    pipeline saved without T5 gets --t5=False in one line; flags take the space form (--t5 False); a
    failed call leaves no empty output folder."""
    base = ["--pretrained", "random:tiny", "--resolution", "32", "--mixed_precision", "no",
            "--num_steps", "2",
            "--n_per_prompt", "2", "--prompts", "assets/tiny_prompts.txt"]
    _sample([*base, "--dino_backbone", "random:tiny", "--out", tmp_path / "plain"])
    plain = json.load(open(tmp_path / "plain" / "metrics.json"))
    assert "dino_sim" not in plain["metrics"] and "no references" in plain["skipped"]["dino_sim"]
    _sample([*base, "--references", "assets/tiny_refs/index.json", "--dino_backbone", "random:tiny",
             "--out", tmp_path / "refs"])
    measured = json.load(open(tmp_path / "refs" / "metrics.json"))["metrics"]
    assert 0 < measured["dino_sim"] <= 1 and np.isfinite(measured["fd_dino"])
    p = _sample(["--pretrained", "assets/tinyworld/pipeline_flawed", "--resolution", "32",
                 "--prompt", "a red circle",
                 "--out", tmp_path / "no_t5"], ok=False)
    assert p.stderr.strip().endswith("was saved without one (no text_encoder_3/): pass --t5=False")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{}")
    p = _sample(["--pretrained", broken, "--t5", "False", "--resolution", "32", "--prompt", "a red circle",
                 "--out", tmp_path / "out"], ok=False)
    assert "could not load the SD3 pipeline" in p.stderr and not (tmp_path / "out").exists()
    assert sorted(os.listdir(tmp_path)) == ["broken", "plain", "refs"]


def test_a_flag_takes_true_or_false_after_a_space():
    import configurator
    import sample
    for argv, t5 in ((["--t5", "False"], False), (["--t5", "True"], True), (["--t5"], True), ([], True)):
        assert configurator.parse(argv, sample.EvalArgs)[0].t5 is t5
    args = configurator.parse(["--overwrite", "--prompt", "a cat"], sample.EvalArgs)[0]
    assert args.overwrite is True and args.prompt == ["a cat"]


def test_a_checkpoint_pruned_while_read_is_filed_as_the_one_that_was_loaded(tmp_path, run_dir, monkeypatch):
    """--ckpt epoch_1 of a live run that pruned it meanwhile: the loader takes the run's newest (epoch_2),
    and the evaluation is filed, labelled and reproduced as epoch_2, not as epoch_1."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("eval"))
    run_main("train.py", [PRESET, f"--out_dir={run}", "--resume", "--epochs=2", "--eval_every=0"])
    first, second = (str(run / "checkpoints" / f"epoch_00000{n}") for n in (1, 2))
    load = C.load_weights
    monkeypatch.setattr(C, "load_weights", lambda gen, path, w=None: load(gen, second))
    _sample(["--ckpt", first, "--prompt", "a red circle on the left", "--n_per_prompt", "1"])
    (out,) = os.listdir(run / "eval")
    assert out.startswith("epoch_000002-")  # its settings differ from the run's: their hash appended
    assert json.load(open(run / "eval" / out / "metrics.json"))["checkpoint"] == second
    assert json.load(open(run / "eval" / out / "reproduce.json"))["lora"] == os.path.join(second, "lora")


def test_overwrite_of_a_run_removes_its_evaluations_but_not_a_users_file(tmp_path, run_dir):
    """An earlier run's eval/epoch_N/ would name the new run's checkpoint as its source: --overwrite removes
    what sample.py wrote there (images, grid, metrics, reproduce.*, lora/), never a user's file."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("eval"))
    _sample(["--ckpt", str(run), "--prompt", "a red circle on the left", "--n_per_prompt", "1", "--out",
             run / "eval" / "epoch_000001"])
    (run / "eval" / "epoch_000001" / "notes.txt").write_text("mine")
    assert (run / "eval" / "epoch_000001" / "lora").is_dir()
    run_main("train.py", [PRESET, f"--out_dir={run}", "--epochs=1", "--eval_every=0", "--overwrite=True"])
    assert os.listdir(run / "eval" / "epoch_000001") == ["notes.txt"]
