"""eval.py: metrics with known answers, the hacking monitor, and the diffusers LoRA round trip."""
import json
import os

import numpy as np
import torch

import checkpoint as C
import eval as E
import train as T
from test_train import ADV_PRESET, tiny_cfg


def test_frechet_distance_of_gaussians_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    b = (torch.randn(20000, 3, generator=g, dtype=torch.float64) * 2
         + torch.tensor([1.0, 0, 0], dtype=torch.float64))
    # N(0, I) vs N(m, 4I): |m|² + tr(I) + tr(4I) - 2·tr(2I) = 1 + 3 + 12 - 12 = 4
    assert abs(E.frechet_distance(a, b) - 4.0) < 0.1
    assert abs(E.frechet_distance(a, a)) < 1e-6


def test_hacking_monitor_fires_only_when_reward_rises_and_held_out_falls():
    up_down = [(0.1, {"toy_geneval": 0.5}), (0.2, {"toy_geneval": 0.45}), (0.3, {"toy_geneval": 0.3})]
    assert "toy_geneval 0.500 → 0.300" in E.hacking_warning(up_down)
    up_up = [(0.1, {"toy_geneval": 0.5}), (0.2, {"toy_geneval": 0.6}), (0.3, {"toy_geneval": 0.7})]
    assert E.hacking_warning(up_up) is None
    assert E.hacking_warning(up_down[:1]) is None       # not enough evaluations yet
    assert "0.500 → 0.450" in E.hacking_warning(up_down[:2])
    # a reward function that changed between evaluations (a discriminator that trains) is not compared
    moving = [(r, m, version) for version, (r, m) in enumerate(up_down)]
    assert E.hacking_warning(moving) is None
    frozen_after_warmup = [(-0.5, {"toy_geneval": 0.9}, 3)] + [(r, m, 7) for r, m in up_down[1:]]
    assert "0.450 → 0.300" in E.hacking_warning(frozen_after_warmup)  # compared from the freeze on
    fd_up = [(0.1, {"fd_dino": 10.0}), (0.2, {"fd_dino": 11.0}), (0.3, {"fd_dino": 12.0})]
    assert "fd_dino 10.000 → 12.000" in E.hacking_warning(fd_up)
    noise = [(0.1, {"toy_geneval": 0.50, "fd_dino": 10.0}), (0.2, {}),
             (0.3, {"toy_geneval": 0.495, "fd_dino": 10.3})]
    assert E.hacking_warning(noise) is None             # within the margins: eval noise, not hacking


def test_paired_dino_sim_uses_own_references_only():
    class Refs:  # prompt a's reference is the generation itself; b's is different
        def __init__(self, imgs):
            self.imgs = imgs

        def images_of(self, p):
            return self.imgs[p]

    gen = torch.rand(2, 3, 8, 8)
    refs = Refs({"a": gen[:1], "b": torch.rand(1, 3, 8, 8)})
    feats = lambda x: (x.flatten(1), None)  # identity "backbone"
    m, _ = E.measure(gen[:1], ["a"], refs, feats)
    assert abs(m["dino_sim"] - 1.0) < 1e-6
    m2, _ = E.measure(gen[:1], ["b"], refs, feats)
    assert m2["dino_sim"] < 0.99

    # two generations, two references: FD-DINO too; a non-finite generation skips both, with the reason
    refs2 = Refs({"a": torch.rand(2, 3, 8, 8)})
    m3, sk3 = E.measure(gen, ["a", "a"], refs2, feats)
    assert m3["fd_dino"] > 0 and "fd_dino" not in sk3
    bad = gen.clone()
    bad[1, 0, 0, 0] = float("nan")
    m4, sk4 = E.measure(bad, ["a", "a"], refs2, feats)
    assert "dino_sim" not in m4 and "fd_dino" not in m4
    assert sk4["fd_dino"] == sk4["dino_sim"] == "non-finite DINO features in 1 of 2 generations"


def test_in_loop_eval_writes_grid_curves_and_summary(tmp_path, monkeypatch):
    seen = []  # the reward-hacking monitor sees every evaluation, the last one (after the loop) included
    monkeypatch.setattr(E, "hacking_warning",
                        lambda h: seen.append(list(h)) or ("flag" if len(h) == 3 else None))
    cfg = tiny_cfg(ADV_PRESET, out_dir=str(tmp_path), epochs=4, eval_every=2, eval_num_steps=4, ema_every=1)
    T.train(cfg)
    assert [len(h) for h in seen] == [1, 2, 3] and all(h[0] == h[0] for h in seen[-1])  # each paired, no NaN
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert lines[-1]["epoch"] == 4 and lines[-1]["hacking_warning"] == 1
    for f in ("curves.png", "summary.json", "samples/epoch_000000.png", "samples/epoch_000004.png"):
        assert os.path.exists(tmp_path / f), f
    s = json.load(open(tmp_path / "summary.json"))
    assert s["epochs"] == {"before": 0, "after": 4}
    assert {"toy_geneval", "background", "dino_sim", "fd_dino"} <= set(s)
    # with ema_every=1 the EMA moved, so the generated images (and some metric) changed
    assert any(v["before"] != v["after"] for k, v in s.items() if k != "epochs")


def test_exported_lora_reproduces_our_samples_in_diffusers(tmp_path):
    """Our eval sampler with the EMA LoRA == a fresh diffusers pipeline + load_lora_weights(ckpt/lora)."""
    import model as M
    cfg = tiny_cfg(ADV_PRESET, out_dir=str(tmp_path), epochs=2, ema_every=1, lr=3e-2)
    gen = T.train(cfg)[0]
    ckpt = C.latest(str(tmp_path))
    prompts = ["a red circle on the left", "a blue square in the centre"]
    ours = E.generate(gen, prompts, seed=3, num_steps=6, guidance_scale=2.0)
    base = E.generate(gen, prompts, seed=3, num_steps=6, guidance_scale=2.0, use_ema=False)
    assert (ours - base).abs().max() > 1e-4  # the LoRA does something

    pipe = M.load_pipeline(cfg.pretrained, t5=False)  # same seed → same random base weights
    pipe.load_lora_weights(os.path.join(ckpt, "lora"))
    # and the file is the same bytes in every process: its target modules (a set in peft) are written sorted
    from safetensors import safe_open
    with safe_open(os.path.join(ckpt, "lora", "pytorch_lora_weights.safetensors"), "pt") as f:
        targets = json.loads(f.metadata()["lora_adapter_metadata"])["transformer.target_modules"]
    assert targets == sorted(targets) and len(targets) == 8
    f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    shape = (pipe.transformer.config.in_channels, cfg.resolution // f, cfg.resolution // f)
    latents = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(3 * 1_000_003 + i))
                           for i in range(len(prompts))])
    theirs = pipe(prompts, latents=latents, num_inference_steps=6, guidance_scale=2.0, output_type="pt",
                  max_sequence_length=cfg.max_sequence_length, height=cfg.resolution,
                  width=cfg.resolution).images
    torch.testing.assert_close(theirs.float(), ours, atol=1e-4, rtol=0)


def test_the_held_out_grid_is_about_4_by_3_with_every_image_where_its_prompt_block_says(tmp_path):
    """54 prompts × 4 images of 32 px (the shapes world's evaluation) were one 305 × 3,692 column: now
    prompt blocks side by side, each caption over its images, every image at grid_layout's place."""
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    images = torch.rand(54 * 4, 3, 32, 32, generator=g)
    labels = [f"prompt {k}" for k in range(54) for _ in range(4)]
    E.save_grid(images, tmp_path / "grid.png", 4, labels, "a title")
    im = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB"))
    assert 1.0 <= im.shape[1] / im.shape[0] <= 2.5 and im.shape[0] < 1200, im.shape
    scale, cols, bw, bh = E.grid_layout(54, 4, 32)
    k, j = 37, 2  # image j of prompt k
    x0, y0 = k % cols * bw + 4 + j * 34 * scale, 20 + k // cols * bh + E.CAPTION
    want = (images[k * 4 + j].permute(1, 2, 0) * 255).round().byte().numpy()
    np.testing.assert_array_equal(im[y0:y0 + 32 * scale:scale, x0:x0 + 32 * scale:scale], want)
