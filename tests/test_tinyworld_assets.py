"""The committed shapes-world assets: they load through the real code paths and do what they claim."""
import dataclasses
import json
import os

import pytest
import torch

import data
import prepare
import model as M
import reward as R
import tinyworld as tw
import train as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "assets", "tinyworld")


def tiny_world_cfg(preset="tiny.py", **kw):
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        cfg = T.parse_args([os.path.join("config", preset)])
    finally:
        os.chdir(cwd)
    for k in ("pretrained", "train_prompts", "test_prompts", "references", "dino_weights"):
        setattr(cfg, k, os.path.join(ROOT, getattr(cfg, k)))
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def builder():
    """assets/tinyworld/build.py, the one-off builder of these assets (not on the import path)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("build", os.path.join(ASSETS, "build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("style", ["dark", "light"])
def test_analyser_scores_the_rendered_references(style):
    refs = data.ReferenceSet.from_index(os.path.join(ASSETS, f"refs_{style}", "index.json"))
    prompts = [p for p in refs.prompts for _ in range(len(refs.images_of(p)))]
    images = torch.cat([refs.images_of(p) for p in refs.prompts])
    assert len(images) == len(tw.all_scenes()) * tw.N_REFS
    assert tw.accuracy(images, prompts)["correct"] >= 0.99


def test_the_preset_describes_the_committed_backbone():
    cfg, b = tiny_world_cfg(), builder().BACKBONE
    assert cfg.dino_backbone == b["model"] and cfg.dino_image_size == b["img_size"]
    assert cfg.dino_kwargs == {k: v for k, v in b.items() if k not in ("model", "img_size")}


def test_prompt_files_are_the_split():
    train, test = tw.split()
    assert ([p["prompt"] for p in data.load_prompts(os.path.join(ASSETS, "train.txt"))]
            == [tw.prompt_of(s) for s in train])
    assert ([p["prompt"] for p in data.load_prompts(os.path.join(ASSETS, "test.txt"))]
            == [tw.prompt_of(s) for s in test])


@pytest.mark.parametrize("base", ["pipeline_flawed", "pipeline_early"])
def test_the_two_quality_bases_make_the_errors_they_are_for(base):
    """pipeline_flawed (config/tiny.py): stray specks, so count is the main error (held-out toy GenEval
    ≈ 0.28). pipeline_early (the control): light only, colour and position right, shape the error
    (≈ 0.5). Both share every part but the transformer with the main pipeline."""
    import eval as E
    cfg = tiny_world_cfg()
    assert cfg.pretrained.endswith("pipeline_flawed")
    cfg = dataclasses.replace(cfg, pretrained=os.path.join(ASSETS, base))
    gen = M.build_generator(cfg, torch.device("cpu"))
    prompts = [p["prompt"] for p in data.load_prompts(cfg.test_prompts)]
    acc = tw.accuracy(E.generate(gen, prompts, num_steps=10, guidance_scale=3.0), prompts)
    if base == "pipeline_flawed":
        assert 0.1 < acc["correct"] < 0.45 and acc["count"] < 0.5 and acc["shape"] > 0.65, acc
    else:
        assert 0.35 < acc["correct"] < 0.7 and acc["colour"] > 0.95 and acc["position"] > 0.95, acc
    for part in ("vae", "text_encoder", "tokenizer", "scheduler"):
        assert os.path.realpath(os.path.join(ASSETS, base, part)) == os.path.join(
            os.path.realpath(ASSETS), "pipeline", part)


def test_assets_load_through_model_and_reward_and_the_base_is_mostly_light():
    cfg = tiny_world_cfg("tiny_style.py")
    gen = M.build_generator(cfg, torch.device("cpu"))
    import eval as E
    prompts = [p["prompt"] for p in data.load_prompts(cfg.test_prompts)]
    images = E.generate(gen, prompts, num_steps=10, guidance_scale=cfg.eval_guidance_scale)
    assert images.shape == (len(prompts), 3, 32, 32)
    acc = tw.accuracy(images, prompts)["correct"]
    dark = float((tw.style_stats(images)["background_brightness"] < 0.5).float().mean())
    # a working base on held-out prompts, that draws the references' dark style only some of the time
    assert acc > 0.6 and 0.1 < dark < 0.7, (acc, dark)
    phi = R.DinoFeatures(R.make_backbone(cfg.dino_backbone, 32, cfg.dino_weights, cfg.dino_kwargs), 32)
    cls, patches = phi(images)
    assert cls.shape == (len(prompts), 64) and patches.shape == (len(prompts), 64, 64)
    # the trained backbone separates the reference styles that a random ViT would not
    dark_refs = data.ReferenceSet.from_index(
        os.path.join(ASSETS, "refs_dark", "index.json")).images_of(prompts[0])
    light = data.ReferenceSet.from_index(
        os.path.join(ASSETS, "refs_light", "index.json")).images_of(prompts[0])
    dark = dark_refs
    c_d, c_l = (torch.nn.functional.normalize(phi(dark)[0], dim=-1),
                torch.nn.functional.normalize(phi(light)[0], dim=-1))
    assert (c_d @ c_d.T).mean() > (c_d @ c_l.T).mean() + 0.05


def test_two_epoch_tiny_world_run(tmp_path):
    cfg = tiny_world_cfg(out_dir=str(tmp_path), epochs=2, eval_every=0, prompts_per_epoch=4, group_size=4,
                         d_warmup=0, sample_batch_size=16, train_batch_size=8, save_every=2)
    counters = T.train(cfg)[2]
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["reward_mean"])) for r in rows)
    assert counters["g_epochs"] == 2 and counters["d_steps"] == 2
    assert os.path.isdir(tmp_path / "checkpoints" / "epoch_000002" / "lora")


@pytest.mark.slow  # 20 s; make_references is also tested on a random pipeline (tests/test_data.py)
def test_references_made_from_the_tiny_pipeline_are_as_good_as_its_own_samples(tmp_path):
    """prepare.make_references on the committed pipeline reads its sample_settings.json (1-token text, 32 px):
    with diffusers' default text length (256 zero tokens) the same command made blank backgrounds and
    smudges (toy GenEval ≈ 0) and exited 0."""
    import eval as E
    prompts = [p["prompt"] for p in data.load_prompts(os.path.join(ASSETS, "train.txt"))][::18]   # 12 prompts
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    index = prepare.make_references(os.path.join(ASSETS, "pipeline"), str(tmp_path / "p.txt"),
                                 str(tmp_path / "refs"), n=2, steps=10, guidance_scale=3.0, device="cpu")
    refs = data.ReferenceSet.from_index(index)
    made = tw.accuracy(torch.cat([refs.images_of(p) for p in prompts]),
                       [p for p in prompts for _ in range(2)])
    gen = M.build_generator(tiny_world_cfg("tiny_style.py"), torch.device("cpu"))  # the same pipeline
    own_prompts = [p for p in prompts for _ in range(2)]
    own = tw.accuracy(E.generate(gen, own_prompts, num_steps=10, guidance_scale=3.0), own_prompts)
    assert (refs.images.shape[-1] == 32 and made["correct"] >= own["correct"] - 0.2
            and made["correct"] > 0.5), (made, own)


def test_plain_diffusers_loads_the_tiny_pipeline_as_the_readme_says():
    """The README's snippet: no T5 component, and the 1-token text length of sample_settings.json."""
    from diffusers import StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline.from_pretrained(os.path.join(ASSETS, "pipeline"), text_encoder_3=None,
                                                    tokenizer_3=None)
    prompts = ["a red circle on the left", "a large blue square at the top"] * 2
    images = pipe(prompts, height=32, width=32, num_inference_steps=10, guidance_scale=3.0,
                  max_sequence_length=1, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert tw.accuracy(images, prompts)["correct"] >= 0.75


def test_the_demo_runs_differ_only_in_freezing_the_discriminator():
    import dataclasses
    adv, frozen, style = (tiny_world_cfg(p) for p in ("tiny.py", "tiny_frozen.py", "tiny_style.py"))
    for cfg in (adv, frozen, style):
        T.validate(cfg, 1)
    diff = {k for k, v in dataclasses.asdict(adv).items() if getattr(frozen, k) != v}
    assert diff == {"schedule", "d_warmup", "d_steps", "out_dir"} and frozen.schedule == "frozen"
    assert style.pretrained.endswith(os.path.join("tinyworld", "pipeline"))
    assert "refs_dark" in style.references


def test_the_demo_monitor_watches_the_fixed_reward_late_in_its_run():
    """The hacking monitor compares the oldest and newest of the last 3 evaluations under one reward. In the
    fixed-reward run of make demo the held-out numbers turn within ~10 epochs of their best (docs/RESULTS.md),
    so those 3 must all come after the warm-up and span at most 10 epochs; with eval_every = 15 they were
    epochs 0, 15, 30 and the monitor compared the run's middle with its end only."""
    frozen = tiny_world_cfg("tiny_frozen.py")
    evals = [e for e in range(frozen.epochs) if e % frozen.eval_every == 0] + [frozen.epochs]
    assert evals[-3] > frozen.d_warmup and evals[-1] - evals[-3] <= 10, evals


def test_the_style_study_keeps_the_settings_it_was_measured_with():
    """config/tiny_style.py builds on config/tiny.py; the README's style-transfer numbers were measured with
    these values, so a change to the demo preset must not move them."""
    style = tiny_world_cfg("tiny_style.py")
    want = dict(group_size=8, prompts_per_epoch=8, sample_batch_size=32, train_batch_size=16,
                updates_per_epoch=2, lr=3e-4, lora_rank=8, clip_range=1e-3, noise_level=0.8, window_size=2,
                num_steps=10, guidance_scale=3.0, d_steps=1, d_warmup=5, d_lr=1e-4, schedule="shared",
                epochs=60, eval_every=10, eval_n_per_prompt=2, ema_decay=0.9, reward={"dino_adv": 1.0},
                d_conditional=False)
    assert {k: getattr(style, k) for k in want} == want


def test_the_references_are_rendered_the_same_bytes_every_time(tmp_path):
    """The shapes world's references are not committed: tinyworld.write_references renders them (make demo
    and make test run it). Every measured shapes-world number was made with these exact files: their hash is
    pinned (the 2,162 PNGs and two index.json once committed)."""
    import hashlib
    tw.write_references(str(tmp_path))
    h = hashlib.sha256()
    for style in tw.REF_STYLES:
        for name in sorted(os.listdir(tmp_path / f"refs_{style}")):
            h.update(f"refs_{style}/{name}".encode())
            h.update((tmp_path / f"refs_{style}" / name).read_bytes())
    assert h.hexdigest() == "9ee02722fa17d22d3ce10c7f11992e50f82716e431fd5a0674ab8a5dd5501c2d"
    assert sorted(os.listdir(tmp_path)) == ["refs_dark", "refs_light"]  # no half-written folder left
