"""What a new user and a red team tripped on (third round), each a line that says what is wrong or a
number that shows it is right."""
import contextlib
import io
import os
import runpy

import pytest

import configurator
from inproc import ROOT, run_main


def _refusal(*args, world=1):
    cfg = configurator.parse_args(["config/tiny.py", *args])
    with pytest.raises(SystemExit) as e:
        configurator.validate(cfg, world)
    return str(e.value)


def test_nonsense_values_are_refused_naming_what_would_do():
    assert "guidance_scale must be in [1, 100]" in _refusal("--guidance_scale=1e30")
    assert "group_size must be ≥ 2: GRPO compares the images of one prompt" in _refusal("--group_size=1")
    assert "sample_batch_size (40; 32 or 48 would do)" in _refusal("--sample_batch_size=40")
    assert "(prompts_per_epoch = 4 or 8 would do)" in _refusal(
        "--prompts_per_epoch=5", "--group_size=3", "--sample_batch_size=1", "--train_batch_size=1", world=4)


def test_what_would_do_is_found_near_the_value_not_by_scanning_up_to_it():
    """A typo's prompts_per_epoch (999,999,999 on 8 ranks) is answered at once: the suggestion looks a few
    values either side, not every number below it (which took a minute)."""
    calls = []

    def multiple_of_8(q):
        calls.append(q)
        assert len(calls) < 100, "scanned far from the value"
        return q % 8 == 0
    assert configurator._nearest(multiple_of_8, 999_999_999, 999_999_999 + 8) == "999999992 or 1000000000"
    assert "(prompts_per_epoch = 999999992 or 1000000000 would do)" in _refusal(
        "--prompts_per_epoch=999999999", "--group_size=3", world=8)


def test_values_that_cannot_be_meant_are_refused():
    """A typo's gigabytes (lora_rank 1e6, d_hidden 1e9), an infinite loss (nft_beta 1e30), an EMA that never
    leaves the base (ema_decay 1), an all-zero reward; and an out_dir among the project's source or the
    run's own inputs (it wrote a run into config/ and into the reference folder)."""
    assert "lora_rank must be ≤ 1024, got 1000000" in _refusal("--lora_rank=1000000")
    assert "d_hidden must be ≤ 65536" in _refusal("--d_hidden=1000000000")
    assert "nft_beta must be ≤ 1000" in _refusal("--objective=nft", "--nft_beta=1e30")
    assert "ema_decay must be < 1" in _refusal("--ema_decay=1.0")
    import reward as R
    assert "every reward weight is 0" in R.check_reward({"brightness": 0, "toy_geneval": {"weight": 0.0}})
    assert R.check_reward({"clip_sim": {"weight": 1, "clip_model": 5}}) == \
        "reward 'clip_sim': clip_model must be a str like 'openai/clip-vit-large-patch14', got 5"  # traceback
    import outputs
    for out in ("config", "assets/tiny_refs", "assets/tinyworld/new_run"):
        cfg = configurator.parse_args(["config/tiny.py", f"--out_dir={out}"])
        with pytest.raises(SystemExit, match="a folder of the project's source or one the run reads"):
            outputs.claim_out_dir(cfg)
    assert not os.path.exists("assets/tinyworld/new_run") and not os.path.exists("config/.lock")


def test_no_exploration_is_said_before_the_first_epoch():
    def said(*args):
        lines = []
        configurator.validate(configurator.parse_args(["config/tiny.py", *args]), 1,
                              warn=lambda line, flush: lines.append(line))
        return lines
    assert any("noise_level = 0" in w for w in said("--noise_level=0")) and said() == []


def test_prepare_help_exits_zero_and_old_commands_say_where_they_went():
    p = run_main("prepare.py", ["--help"])
    assert p.returncode == 0 and "import_prompts" in p.stdout
    for script, where in (("eval.py", "sample.py"), ("data.py", "prepare.py")):
        with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(io.StringIO()) as out:
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
        assert e.value.code == 1 and where in out.getvalue()


def test_reward_weights_missing_offline_are_listed_with_the_other_inputs_before_the_generator(monkeypatch,
                                                                                             tmp_path):
    import model as M
    monkeypatch.setattr(M, "build_generator", lambda *a, **k: pytest.fail("the generator was loaded"))
    p = run_main("train.py", ["config/tiny_random_adv.py", "--dino_backbone=vit_small_patch14_dinov2.lvd142m",
                              "--dino_image_size=28", "--train_prompts=nope.txt", f"--out_dir={tmp_path}"],
                 ok=False)
    assert "prompt file nope.txt does not exist" in p.stderr
    assert ("feature backbone (dino_backbone): timm/vit_small_patch14_dinov2.lvd142m is not in the hub cache"
            in p.stderr)


def test_restating_a_key_on_resume_with_its_own_value_changes_nothing(tmp_path):
    """--resume --sde_kind=cps (the run's value) keeps the run's clip_range; --pretrained=random:tiny (the
    same)
    keeps its text length; {'dino_adv': 1.0} and {'dino_adv': {'weight': 1.0}} are one reward."""
    import outputs as O
    import train as T
    out = str(tmp_path / "run")
    run_main("train.py", ["config/tiny_random_adv.py", f"--out_dir={out}", "--epochs=1", "--clip_range=0.01"])
    cfg = T.parse_args(["config/tiny_random_adv.py", f"--out_dir={out}", "--resume", "--sde_kind=cps",
                        "--pretrained=random:tiny", "--reward={'dino_adv': {'weight': 1.0}}"])
    assert cfg.clip_range == 0.01 and cfg.max_sequence_length == 8
    saved = __import__("json").load(open(os.path.join(out, "config.json")))
    assert O.config_changes(saved, cfg) == []
    cfg = T.parse_args(["config/tiny_random_adv.py", f"--out_dir={out}", "--resume", "--sde_kind=sde"])
    assert cfg.clip_range == 1e-4  # another value: re-derived


def test_a_prompt_aware_head_on_several_ranks_is_said_to_depend_on_their_number():
    cfg = configurator.parse_args(["config/tiny.py", "--d_conditional=True"])
    import reward as R
    assert R.check_config(cfg, 1) == (None, [])
    (line,) = R.check_config(cfg, 2)[1]
    assert line.startswith("d_conditional on 2 ranks") and "depends on the number of ranks" in line
