"""The committed shapes-world assets: they load through the real code paths and do what they claim."""
import json
import os

import pytest
import torch

import data
import reward as R
import tinyworld as tw
import train as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "assets", "tinyworld")


def tiny_world_cfg(**kw):
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        cfg = T.parse_args([os.path.join("config", "tiny.py")])
    finally:
        os.chdir(cwd)
    for k in ("pretrained", "train_prompts", "test_prompts", "references", "dino_weights"):
        setattr(cfg, k, os.path.join(ROOT, getattr(cfg, k)))
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.mark.parametrize("style", tw.REF_STYLES)
def test_analyser_scores_the_committed_references(style):
    refs = data.ReferenceSet.from_index(os.path.join(ASSETS, f"refs_{style}", "index.json"))
    prompts = [p for p in refs.prompts for _ in range(len(refs.images_of(p)))]
    images = torch.cat([refs.images_of(p) for p in refs.prompts])
    assert len(images) == len(tw.all_scenes()) * tw.N_REFS
    assert tw.accuracy(images, prompts)["correct"] >= 0.99


def test_prompt_files_are_the_split():
    train, test = tw.split()
    assert [p["prompt"] for p in data.load_prompts(os.path.join(ASSETS, "train.txt"))] == [tw.prompt_of(s) for s in train]
    assert [p["prompt"] for p in data.load_prompts(os.path.join(ASSETS, "test.txt"))] == [tw.prompt_of(s) for s in test]


def test_assets_load_through_model_and_reward_and_the_base_is_mostly_light():
    cfg = tiny_world_cfg()
    ctx = T.build(cfg, torch.device("cpu"), 0, 1)
    import eval as E
    prompts = [p["prompt"] for p in data.load_prompts(cfg.test_prompts)]
    images = E.generate(ctx, prompts, num_steps=10, guidance_scale=cfg.eval_guidance_scale)
    assert images.shape == (len(prompts), 3, 32, 32)
    acc = tw.accuracy(images, prompts)["correct"]
    dark = float((tw.style_stats(images)["background_brightness"] < 0.5).float().mean())
    # a working base on held-out prompts, that draws the references' dark style only some of the time
    assert acc > 0.6 and 0.1 < dark < 0.7, (acc, dark)
    phi = R.DinoFeatures(R.make_backbone(cfg.dino_backbone, 32, cfg.dino_weights, cfg.dino_kwargs), 32)
    cls, patches = phi(images)
    assert cls.shape == (len(prompts), 64) and patches.shape == (len(prompts), 64, 64)
    # the trained backbone separates the reference styles that a random ViT would not
    dark_refs = data.ReferenceSet.from_index(os.path.join(ASSETS, "refs_dark", "index.json")).images_of(prompts[0])
    light = data.ReferenceSet.from_index(os.path.join(ASSETS, "refs_light", "index.json")).images_of(prompts[0])
    dark = dark_refs
    c_d, c_l = torch.nn.functional.normalize(phi(dark)[0], dim=-1), torch.nn.functional.normalize(phi(light)[0], dim=-1)
    assert (c_d @ c_d.T).mean() > (c_d @ c_l.T).mean() + 0.05


def test_two_epoch_tiny_world_run(tmp_path):
    cfg = tiny_world_cfg(out_dir=str(tmp_path), epochs=2, eval_every=0, prompts_per_epoch=4, group_size=4, d_warmup=0,
                         sample_batch_size=16, train_batch_size=8, save_every=2)
    ctx = T.train(cfg)
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["reward_mean"])) for r in rows)
    assert ctx["counters"]["g_epochs"] == 2 and ctx["counters"]["d_steps"] == 2
    assert os.path.isdir(tmp_path / "checkpoints" / "epoch_000001" / "lora")
