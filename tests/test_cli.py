"""The first hour: --help, sample.py offline in seconds, eval like the run, one epoch number, readable logs,
a LoRA to start from, the published data imported."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import configurator
import outputs as O
import data
import model as M
import prepare
from inproc import run_main
from test_train import ADV_PRESET, ROOT, tiny_cfg


def _py(args, env_extra=None, drop=(), ok=True, timeout=240):
    same_env = not drop and set(env_extra or {}) <= {"HF_HUB_OFFLINE"}
    if same_env and args[0] in ("train.py", "sample.py", "prepare.py", "bench.py"):
        return run_main(args[0], args[1:], ok)  # same environment: no new interpreter needed
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env_extra or {}))
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert (p.returncode == 0) == ok, p.stdout[-2000:] + p.stderr[-3000:]
    return p


@pytest.mark.parametrize("script, schemas", [("train.py", "Config"), ("sample.py", "EvalArgs"),
                                             ("bench.py", "Bench Config"),
                                             ("prepare.py make_references", "MakeReferences")])
def test_help_lists_every_key_with_its_default_and_comment(script, schemas):
    import bench
    import prepare
    import sample
    out = _py([*script.split(), "--help"]).stdout
    for name in schemas.split():
        cls = {"Config": configurator.Config, "EvalArgs": sample.EvalArgs, "Bench": bench.Bench,
               "MakeReferences": prepare.MakeReferences}[name]
        for key, text in configurator.comments(cls).items():
            if text is not None:
                assert text, f"{name}.{key} has no comment"
                assert f"--{key}={getattr(cls(), key)!r}" in out and text[:30] in out, key


@pytest.mark.parametrize("argv, says", [(["train.py", "--help"], "--lr=0.0003"),
                                        (["sample.py", "--help"], "--n_per_prompt=None"),
                                        (["prepare.py", "--help"], "import_references --index"),
                                        (["prepare.py", "make_references", "--help"], "--steps=50")])
def test_help_answers_before_torch_loads(argv, says):
    """`--help` of each script prints every key without importing torch (which takes ~7 s on its own)."""
    code = (f"import runpy, sys\nsys.argv = {argv!r}\ntry:\n"
            f"    runpy.run_path({argv[0]!r}, run_name='__main__')\nexcept SystemExit as e:\n"
            "    print('exit', e.code)\nprint('torch loaded:', 'torch' in sys.modules)")
    out = _py(["-c", code]).stdout
    assert says in out and "exit 0" in out, out[-500:]
    assert out.strip().endswith("torch loaded: False"), out[-500:]


def test_key_value_with_a_space_and_a_clear_type_error():
    cfg = configurator.parse_args(["--lr", "0.1", "--seed", "3", "--resume", "--window_start", "random"])
    assert (cfg.lr, cfg.seed, cfg.resume, cfg.window_start) == (0.1, 3, True, "random")
    with pytest.raises(SystemExit, match="write --group_size=<value>"):
        configurator.parse_args(["--group_size", "--lr=0.1"])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-epoch run with an in-loop evaluation at epochs 0 and 2 (the end)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    p = _py(["train.py", ADV_PRESET, f"--out_dir={out}", "--epochs=2", "--eval_every=2", "--eval_num_steps=3",
             "--test_prompts=assets/tiny_prompts.txt", "--ema_every=1"], {"HF_HUB_OFFLINE": "1"})
    return out, p.stdout


def test_checkpoint_grid_and_summary_carry_one_epoch_number(run):
    out, stdout = run
    assert (os.path.isdir(out / "checkpoints" / "epoch_000002")
            and os.path.isfile(out / "samples" / "epoch_000002.png"))
    assert json.load(open(out / "summary.json"))["epochs"] == {"before": 0, "after": 2}
    assert "held-out before (epoch 0) → after (epoch 2)" in stdout
    assert "epoch    1/2" in stdout and "ETA" in stdout and '"pretrained"' not in stdout  # no config dump
    assert json.load(open(out / "config.json"))["epochs"] == 2


def test_eval_skips_hub_models_in_seconds_offline_and_evaluates_like_the_run(run, tmp_path):
    """No HF_HUB_OFFLINE, no network, no cache: PickScore / CLIP are skipped with the reason, fast. By
    default sample.py uses the run's own eval steps, CFG and prompts."""
    out, _ = run
    t = time.time()
    p = _py(["sample.py", "--ckpt", str(out / "checkpoints" / "epoch_000002"), "--out", str(tmp_path)],
            {"HF_HOME": str(tmp_path / "hf")}, drop=("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    assert time.time() - t < 30
    assert "skipped pickscore" in p.stdout and "hub is unreachable" in p.stdout
    m = json.load(open(tmp_path / "metrics.json"))
    cfg = json.load(open(out / "config.json"))
    assert (m["num_steps"], m["guidance_scale"]) == (cfg["eval_num_steps"], cfg["eval_guidance_scale"])
    assert m["prompts"] == [line.strip() for line in open(os.path.join(ROOT, "assets", "tiny_prompts.txt"))]
    # the run's in-loop numbers of the same weights, same seed: sample.py reproduces them
    last = [json.loads(line) for line in open(out / "metrics.jsonl")][-1]
    assert abs(m["metrics"]["toy_geneval"] - last["eval/toy_geneval"]) < 1e-9
    assert abs(m["metrics"]["dino_sim"] - last["eval/dino_sim"]) < 1e-4


def test_a_run_without_generator_steps_says_so(tmp_path):
    p = _py(["train.py", ADV_PRESET, f"--out_dir={tmp_path / 'r'}", "--epochs=2", "--d_warmup=5",
             "--eval_every=2", "--eval_num_steps=2", "--test_prompts=assets/tiny_prompts.txt"],
            {"HF_HUB_OFFLINE": "1"})
    assert "the generator was never updated (0 G steps" in p.stdout


def test_training_starts_from_an_exported_lora(run):
    """init_lora: a checkpoint's diffusers-format lora/ (its EMA weights) is where the next run starts."""
    from safetensors.torch import load_file
    out, _ = run
    cfg = tiny_cfg(ADV_PRESET, init_lora=str(out / "checkpoints" / "epoch_000002" / "lora"))
    gen = M.build_generator(cfg, torch.device("cpu"))
    ema = load_file(str(out / "checkpoints" / "epoch_000002" / "ema.safetensors"))
    assert gen.params.keys() == ema.keys() and all(torch.allclose(gen.params[k], ema[k]) for k in ema)
    # the EMA starts there too
    assert torch.equal(gen.ema.shadow[next(iter(ema))], gen.params[next(iter(ema))])
    with pytest.raises(SystemExit, match="lora_rank=4 --lora_alpha=8"):
        M.build_generator(tiny_cfg(ADV_PRESET, init_lora=cfg.init_lora, lora_rank=8, lora_alpha=16),
                          torch.device("cpu"))


def test_the_sample_grid_goes_to_wandb_with_the_scalars(monkeypatch, tmp_path):
    import types

    import train as T
    calls = []
    fake = types.SimpleNamespace(
        init=lambda **kw: types.SimpleNamespace(log=lambda d, step: calls.append((d, step))),
        Image=lambda path: ("image", path))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log = O.external_logger(tiny_cfg(log_to="wandb", out_dir=str(tmp_path)))
    log({"epoch": 4, "reward_mean": 0.5}, str(tmp_path / "grid.png"))
    assert calls == [({"epoch": 4, "reward_mean": 0.5, "samples": ("image", str(tmp_path / "grid.png"))}, 4)]


def test_the_published_prompt_sets_and_reference_indexes_import(tmp_path):
    (tmp_path / "train.txt").write_text("a cat \n\n  a dog\n")
    assert prepare.import_prompts(str(tmp_path / "train.txt"), str(tmp_path / "out" / "train.txt")) == (2, 1)
    assert [p["prompt"] for p in data.load_prompts(str(tmp_path / "out" / "train.txt"))] == ["a cat", "a dog"]
    (tmp_path / "m.jsonl").write_text(json.dumps({"prompt": "a cat", "tag": "single_object"}) + "\n")
    prepare.import_prompts(str(tmp_path / "m.jsonl"), str(tmp_path / "out" / "m.jsonl"))
    assert (data.load_prompts(str(tmp_path / "out" / "m.jsonl"))
            == [{"prompt": "a cat", "tag": "single_object"}])
    from PIL import Image
    imgs = tmp_path / "qwen"
    imgs.mkdir()
    for n in ("node0_rank0_00000_0.png", "node1_rank0_00000_0.png"):
        Image.new("RGB", (8, 8)).save(imgs / n)
    (imgs / "prompt2img_node0.json").write_text(json.dumps({"a cat": ["node0_rank0_00000_0.png"]}))
    (imgs / "prompt2img_node1.json").write_text(
        json.dumps({"a dog": ["node1_rank0_00000_0.png", "gone.png"]}))
    out = str(tmp_path / "data" / "refs" / "index.json")
    n_prompts, n_files, missing = prepare.import_references(
        sorted(map(str, imgs.glob("prompt2img_node*.json"))), str(imgs), out)
    assert (n_prompts, n_files) == (2, 3) and [os.path.basename(m) for m in missing] == ["gone.png"]
    refs = data.ReferenceSet.from_index(out, skip_bad=True)
    assert refs.prompts == ["a cat", "a dog"] and len(refs) == 2
    assert configurator.Config().references == "data/refs/index.json"   # where the README puts it


def test_a_failed_import_leaves_the_users_file_as_it_was(tmp_path):
    """A source with no prompts, an index of the wrong shape or no --index at all is refused, and the
    prompt file or index it would have replaced keeps its content (written through .tmp, renamed last)."""
    good, index = tmp_path / "train.txt", tmp_path / "index.json"
    good.write_text("a cat\n")
    index.write_text('{"a cat": ["cat.png"]}')
    (tmp_path / "blank.txt").write_text("\n  \n")
    (tmp_path / "list.json").write_text('["a cat"]')
    for call in (lambda: prepare.import_prompts(str(tmp_path / "blank.txt"), str(good)),
                 lambda: prepare.import_references([], str(tmp_path), str(index)),
                 lambda: prepare.import_references([str(tmp_path / "list.json")], str(tmp_path), str(index))):
        with pytest.raises(ValueError):
            call()
    assert good.read_text() == "a cat\n" and index.read_text() == '{"a cat": ["cat.png"]}'
    assert sorted(os.listdir(tmp_path)) == ["blank.txt", "index.json", "list.json", "train.txt"]  # no .tmp


def test_a_fixed_dino_sim_run_measures_the_held_out_set_with_its_dino(tmp_path):
    # with no discriminator, the DINO φ of the dino_sim reward still gives FD-DINO and paired similarity
    _py(["train.py", ADV_PRESET, f"--out_dir={tmp_path / 'r'}", "--epochs=1", "--eval_every=1",
         "--eval_num_steps=2", "--test_prompts=assets/tiny_prompts.txt", "--reward={'dino_sim': 1.0}"],
        {"HF_HUB_OFFLINE": "1"})
    first = json.loads(open(tmp_path / "r" / "metrics.jsonl").readline())
    assert {"eval/dino_sim", "eval/fd_dino"} <= set(first) and first["reward/dino_sim"] > 0


# --- said at the start, not the end -----------------------------------------------------------------

def test_a_schedule_that_never_trains_the_generator_is_said_before_the_first_epoch(tmp_path, capsys):
    import train as T
    T.check_inputs(tiny_cfg(ADV_PRESET, out_dir=str(tmp_path / "a"), epochs=2, d_warmup=5), 1)
    assert ("WARNING the generator will never be trained (0 G steps): epochs = 2 ≤ d_warmup = 5"
            in capsys.readouterr().out)
    paper = dict(schedule="paper", d_times=10)
    T.check_inputs(tiny_cfg(ADV_PRESET, out_dir=str(tmp_path / "b"), epochs=9, **paper), 1)
    assert "0 G steps): schedule 'paper' trains it where (epoch + 1) % d_times = 0" in capsys.readouterr().out
    T.check_inputs(tiny_cfg(ADV_PRESET, out_dir=str(tmp_path / "c"), epochs=10, **paper), 1)
    assert "WARNING" not in capsys.readouterr().out


def test_every_missing_input_is_reported_at_once(tmp_path):
    import train as T
    cfg = tiny_cfg(ADV_PRESET, out_dir=str(tmp_path / "run"), eval_every=1, pretrained=str(tmp_path / "sd35"),
                   train_prompts=str(tmp_path / "tr.txt"), test_prompts=str(tmp_path / "te.txt"),
                   references=str(tmp_path / "refs.json"), dino_weights=str(tmp_path / "dino.safetensors"))
    with pytest.raises(SystemExit) as e:
        T.check_inputs(cfg, 1)
    lines = str(e.value).splitlines()
    for name in ("tr.txt", "te.txt", "refs.json", "sd35", "dino.safetensors"):
        assert sum(name in line for line in lines) == 1, (name, lines)
    assert len(lines) == 5 and not os.path.exists(tmp_path / "run")
    with pytest.raises(SystemExit) as e:  # offline, the recipe's hub id not in the cache: said before loading
        T.check_inputs(T.parse_args([f"--out_dir={tmp_path / 'run'}", f"--train_prompts={ADV_PRESET}"]), 1)
    assert ("stabilityai/stable-diffusion-3.5-medium is not in the hub cache and HF_HUB_OFFLINE=1: "
            "`hf auth login`") in str(e.value)


def test_random_sd35_medium_says_what_it_builds_before_building(monkeypatch, capsys):
    class Built(Exception):
        pass

    def transformer(**kw):
        raise Built
    monkeypatch.setattr(M, "SD3Transformer2DModel", transformer)
    with pytest.raises(Built):
        M.random_pipeline("sd3.5-medium", t5=True, dtype=torch.bfloat16)
    assert ("building random:sd3.5-medium: 7.9 B random parameters, 16 GB of cpu memory in torch.bfloat16; "
            "about a minute") in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown random architecture 'nope'; known: random:sd3.5-medium, "
                                         "random:tiny$"):
        M.load_pipeline("random:nope")


def test_the_missing_weights_hint_works_with_the_recipe_and_names_the_venvs_cli(tmp_path):
    """The error for missing SD3.5 weights names the `hf` CLI this environment ships, and its random-weight
    hint, added to the recipe it is printed for (the defaults), samples."""
    import train as T
    with pytest.raises(SystemExit) as e:
        M.load_pipeline(str(tmp_path / "no_model"))
    assert "`hf auth login`" in str(e.value)
    assert os.path.isfile(os.path.join(os.path.dirname(sys.executable), "hf"))  # huggingface_hub's CLI
    hint = str(e.value).split("a smoke run on random weights: ")[1].rstrip(".").split()
    assert "at most 128 px" in configurator.check(T.parse_args(["--pretrained=random:tiny"]))
    cfg = T.parse_args(hint)
    assert configurator.check(cfg) is None
    gen = M.build_generator(cfg, torch.device("cpu"))
    batch = T.sample_epoch(cfg, 0, gen, ["a red circle"], [0], 0, progress=False)
    assert batch["images"].shape == (1, 3, 32, 32) and torch.isfinite(batch["images"]).all()


@pytest.mark.parametrize("args, says", [
    (["--model", "/nonexistent", "--prompts", "assets/tiny_prompts.txt"], "no model folder /nonexistent"),
    (["--model", "assets/tinyworld/pipeline", "--prompts", "nothere.txt"], "nothere.txt does not exist"),
    (["--model", "assets/tinyworld/pipeline", "--prompts", "assets/tiny_prompts.txt", "--size", "7",
      "--steps", "1", "--n", "1"], "have to be divisible by 4")])
def test_make_references_refuses_in_one_line(tmp_path, args, says):
    """A missing model, prompt file or an impossible size: one line, not the library's traceback."""
    from inproc import run_main
    err = run_main("prepare.py", ["make_references", *args, "--out", tmp_path / "r"], ok=False).stderr
    last = err.strip().splitlines()[-1]  # after the pipeline's loading bars, where it loads
    assert last.startswith("make_references: ") and says in last and "Traceback" not in err, err
