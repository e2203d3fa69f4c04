"""
assets/tinyworld/build.py — builds every committed asset of the shapes world (tinyworld.py) into this
folder. Run once, deterministically, from the repository root:

    python assets/tinyworld/build.py [OUT [SCALE]]     # SCALE < 1 shortens every training run (a smoke test)

Not imported by the project: the committed files are its output. The world itself — grammar, renderer,
analyser — is tinyworld.py.
"""
import json
import os
import shutil
import sys
import time

import numpy as np
import torch

# the repository root
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from tinyworld import (COLOURS, POSITIONS, SHAPES, STYLES, all_scenes, prompt_of, render, split,  # noqa: E402
                       to_tensor, write_references)

# -----------------------------------------------------------------------------------------------
# The builder of the committed assets: `python assets/tinyworld/build.py` (deterministic; main base ~25 min)
#
#   assets/tinyworld/pipeline_flawed/ the quality demo's base: the main transformer fine-tuned FLAWED_STEPS
#                                     on light renders, a SPECK_FRAC share of them with stray specks of
#                                     paint (tinyworld.draw_specks): it draws clean shapes and, often, specks
#   assets/tinyworld/pipeline_early/  the same, transformer stopped at EARLY_STEPS, light renders only:
#                                     binding errors (a round square), the quality demo's control
#   assets/tinyworld/pipeline/        a StableDiffusion3Pipeline folder (no T5): tiny VAE (32² → 4×16²),
#                                     tiny MMDiT trained by flow matching on renders of the train prompts,
#                                     90% light and 10% dark, two frozen random CLIP text encoders with a
#                                     word-level CLIP BPE tokenizer generated from the grammar
#   assets/tinyworld/backbone.safetensors   a tiny DINOv2-style timm ViT trained to name colour, shape,
#                                     position and style: the stand-in for DINOv2 (features that see both
#                                     content and style; a random ViT's CLS is
#                                     near-identical for every image, cosine ≈ 0.99)
#   assets/tinyworld/{train,test}.txt        prompts: 216 train scenes, 54 held-out
#                                            (18 combinations × 3 sizes)
#   assets/tinyworld/refs_<style>/           4 references per prompt + index.json (the published format),
#                                            rendered by tinyworld.write_references, not committed
#
# Why light → dark: a prototype of this world measured that global properties move within minutes under
# Adv-GRPO while shape faithfulness does not, so the demo's main setting is distribution transfer (the
# paper's style-customisation claim): the base mostly draws light backgrounds, the references are all dark.

BACKBONE = dict(model="vit_small_patch14_dinov2", img_size=32, patch_size=4, embed_dim=64, depth=4,
                # init_values=1: DINOv2's LayerScale 1e-5 would make a small ViT train slowly
                num_heads=4, init_values=1.0)
DARK_FRAC = 0.1  # share of dark renders in the base's training set
EARLY_STEPS = 600  # the early base: toy GenEval ≈ 0.5 on held-out prompts (500 steps: 0.23; 800: 0.85)
# The flawed base: 400 steps at lr 1e-3 from the main base, 60 % of the renders with 1-2 specks of radius
# tinyworld.SPECK_RADIUS. Measured on 576 generations of 72 training prompts (docs/tiny_shape_signal.py):
# toy GenEval 0.28, the paper's head separates flawed from clean at within-prompt AUC 0.87-0.90. (Specks
# of radius 0.06-0.08 gave held-out toy GenEval 0.565, every error a count error, but AUC only 0.69-0.77.)
FLAWED_STEPS, SPECK_FRAC = 400, 0.6


def backbone_kwargs():
    """timm.create_model kwargs of the tiny backbone (the `dino_kwargs` of config/tiny.py)."""
    return {k: v for k, v in BACKBONE.items() if k not in ("model", "img_size")}


def _words():
    return sorted({w for s in all_scenes() for w in prompt_of(s).split()})


def _log(t0, msg):
    print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)


def _render_pool(scenes, n_jitter, style, seed, speck_frac=0.0):
    """Every scene rendered n_jitter times with jitter: (len(scenes)·n_jitter, 3, 32, 32) and prompts.
    A `speck_frac` share of the renders (drawn at random) carries 1 or 2 stray specks of paint."""
    rng = np.random.default_rng(seed)
    # (no draw at all when speck_frac = 0: the clean bases keep their random streams)
    specks = lambda: int(rng.integers(1, 3)) if speck_frac and rng.random() < speck_frac else 0  # noqa: E731
    imgs = torch.stack([to_tensor(render(s, 32, style, rng, specks=specks()))
                        for s in scenes for _ in range(n_jitter)])
    return imgs, [prompt_of(s) for s in scenes for _ in range(n_jitter)]


def build_vae(t0, steps=1200):
    """A factor-2 AutoencoderKL trained on all three styles (the VAE must be able to draw the target
    style even though the base transformer never sees it)."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=32, use_quant_conv=False,
                        use_post_quant_conv=False)
    pool = torch.cat([_render_pool(all_scenes(), 2, st, 10 + i)[0] for i, st in enumerate(STYLES)])
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        x = pool[torch.randint(len(pool), (64,), generator=g)] * 2 - 1          # (64, 3, 32, 32) in [-1, 1]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        loss = (rec - x).abs().mean() + ((rec - x) ** 2).mean() + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            _log(t0, f"vae step {step} loss {loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        z = vae.encode(pool[::7] * 2 - 1).latent_dist.mean
    vae.register_to_config(shift_factor=z.mean().item(), scaling_factor=1 / z.std().item())
    return vae


def build_text_encoders():
    """Two frozen random CLIP text encoders (SD3's CLIP-L and CLIP-G slots) and the word tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    from model import char_tokenizer
    tok = char_tokenizer(16, _words())
    encs = []
    for i in range(2):
        torch.manual_seed(100 + i)
        encs.append(CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, projection_dim=32, max_position_embeddings=16, hidden_act="quick_gelu",
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.eos_token_id)).eval())
    return tok, encs


def build_transformer(t0, pipe, train_scenes, steps=2000, dark_frac=0.0, lr=1e-3, init=None, seed=1,
                      speck_frac=0.0):
    """The base model: flow matching (logit-normal t, 10% empty-prompt dropout for CFG) on VAE latents of
    renders of the training prompts, a `dark_frac` share of them dark (~0.4 s a step at batch 128 on 2
    cores). `init`: a folder of transformer weights to continue from."""
    from diffusers import SD3Transformer2DModel
    from model import PromptEncoder
    torch.manual_seed(0)
    if init:
        tr = SD3Transformer2DModel.from_pretrained(init, torch_dtype=torch.float32)
    else:
        tr = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=4,
                                   attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
                                   caption_projection_dim=128, pooled_projection_dim=64,
                                   pos_embed_max_size=16)
    pipe.register_modules(transformer=tr)  # encode_prompt reads joint_attention_dim from it
    enc = PromptEncoder(pipe, "cpu", max_sequence_length=1)
    imgs, prompts = _render_pool(train_scenes, 24, "light", seed, speck_frac)
    if dark_frac > 0:  # replace a random share of the renders by the same scenes drawn dark
        dark, _ = _render_pool(train_scenes, 24, "dark", seed + 100)
        pick = torch.rand(len(imgs), generator=torch.Generator().manual_seed(seed)) < dark_frac
        imgs[pick] = dark[pick]
    vae = pipe.vae
    with torch.no_grad():
        lat = torch.cat([vae.encode(x * 2 - 1).latent_dist.mean for x in imgs.split(256)])
        lat = (lat - vae.config.shift_factor) * vae.config.scaling_factor           # (N, 4, 16, 16)
        emb, pool = enc(prompts)
        emb0, pool0 = enc([""])
    opt = torch.optim.AdamW(tr.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        i = torch.randint(len(lat), (128,), generator=g)
        x0, e, p = lat[i], emb[i], pool[i]
        drop = torch.rand(128, generator=g) < 0.1
        e = torch.where(drop[:, None, None], emb0, e)
        p = torch.where(drop[:, None], pool0, p)
        t = torch.sigmoid(torch.randn(128, generator=g))                            # logit-normal σ
        noise = torch.randn(x0.shape, generator=g)
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        v = tr(hidden_states=xt, timestep=t * 1000, encoder_hidden_states=e, pooled_projections=p,
               return_dict=False)[0]
        loss = ((v - (noise - x0)) ** 2).mean()
        for grp in opt.param_groups:
            grp["lr"] = lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * (1 - step / steps))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tr.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            _log(t0, f"transformer step {step} loss {loss.item():.4f}")
    tr.eval()
    return tr


def build_backbone(t0, steps=800):
    """The DINOv2 stand-in: a tiny ViT trained to name colour, shape, position and style of renders in
    every style, so its tokens carry both content and style. Returns the backbone (heads dropped)."""
    import timm
    torch.manual_seed(0)
    vit = timm.create_model(BACKBONE["model"], pretrained=False, num_classes=0, img_size=32,
                            **backbone_kwargs())
    names = [list(COLOURS), list(SHAPES), list(POSITIONS), list(STYLES)]
    heads = torch.nn.ModuleList(torch.nn.Linear(vit.num_features, len(n)) for n in names)
    scenes = all_scenes()
    data, labels = [], []
    for i, st in enumerate(STYLES):
        rng = np.random.default_rng(20 + i)
        for s in scenes:
            for _ in range(2):
                data.append(to_tensor(render(s, 32, st, rng)))
                labels.append([names[0].index(s.colour), names[1].index(s.shape),
                               names[2].index(s.position), i])
    data, labels = torch.stack(data), torch.tensor(labels)
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    opt = torch.optim.AdamW([*vit.parameters(), *heads.parameters()], lr=1e-3)
    g = torch.Generator().manual_seed(2)
    for step in range(steps):
        i = torch.randint(len(data), (64,), generator=g)
        x = data[i] + 0.05 * torch.randn(data[i].shape, generator=g)  # noise: generations are noisy
        f = vit.forward_features((x - mean) / std)
        cls = f[:, 0]
        loss = sum(torch.nn.functional.cross_entropy(h(cls), labels[i, k]) for k, h in enumerate(heads))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            acc = [(h(cls).argmax(1) == labels[i, k]).float().mean().item() for k, h in enumerate(heads)]
            _log(t0, f"backbone step {step} loss {loss.item():.3f} acc colour/shape/pos/style {acc}")
    return vit.eval()


def build(out="assets/tinyworld", scale=1.0):
    """Build every asset of the tiny world into `out` (see the section comment above). `scale` < 1
    shortens every training run (a smoke test of the builder; the assets are then useless)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from safetensors.torch import save_file
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    train_scenes, test_scenes = split()
    for name, sc in (("train", train_scenes), ("test", test_scenes)):
        with open(os.path.join(out, f"{name}.txt"), "w") as f:
            f.write("\n".join(prompt_of(s) for s in sc) + "\n")
    write_references(out)  # references: N_REFS jittered renders per prompt, train and test (~1 s)
    _log(t0, "prompts and references written")
    # Each stage is skipped when its output exists (every stage is seeded, so a rerun after an
    # interruption gives the same assets as one uninterrupted build).
    if not os.path.exists(os.path.join(out, "backbone.safetensors")):
        backbone = build_backbone(t0, steps=max(2, int(800 * scale)))
        save_file({k: v.contiguous() for k, v in backbone.state_dict().items()},
                  os.path.join(out, "backbone.safetensors"))
    if os.path.isdir(os.path.join(out, "pipeline", "vae")):
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(os.path.join(out, "pipeline", "vae"))
    else:
        vae = build_vae(t0, steps=max(2, int(1200 * scale)))
    tok, (te1, te2) = build_text_encoders()
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=vae,
                                    text_encoder=te1, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok,
                                    text_encoder_3=None, tokenizer_3=None, transformer=None)
    # A DARK_FRAC share of the base's training renders are dark, so it draws a dark background now and
    # then, unprompted. Adv-GRPO can only reweight what the policy ever samples: a light-only base gives
    # every group the same background and its adversarial reward then pushes elsewhere (measured:
    # background flat, content collapsing). The paper's premise is the same: SD3.5 can draw the
    # references' style, rarely; Adv-GRPO makes it the norm.
    from model import SETTINGS_FILE  # what diffusers cannot know: the text length it was trained with
    # Two bases: "pipeline" (2,000 steps, 90 % light / 10 % dark: the style-transfer study) and
    # "pipeline_early" (the same recipe stopped at EARLY_STEPS, light only: blobby shapes), and
    # "pipeline_flawed" (the main one fine-tuned on light renders, a SPECK_FRAC share with specks)
    main_weights = os.path.join(out, "pipeline", "transformer")
    stages = (("pipeline", 2000, dict(dark_frac=DARK_FRAC)), ("pipeline_early", EARLY_STEPS, {}),
              ("pipeline_flawed", FLAWED_STEPS, dict(init=main_weights, speck_frac=SPECK_FRAC)))
    for name, steps, kw in stages:
        if os.path.isfile(os.path.join(out, name, SETTINGS_FILE)):
            continue
        tr = build_transformer(t0, pipe, train_scenes, steps=max(2, int(steps * scale)), **kw)
        pipe.register_modules(transformer=tr.half())  # fp16 on disk halves the size; training loads float32
        pipe.save_pretrained(os.path.join(out, name))
        with open(os.path.join(out, name, SETTINGS_FILE), "w") as f:
            json.dump(dict(max_sequence_length=1, resolution=32), f)
    for part in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        for name in ("pipeline_early", "pipeline_flawed"):  # identical to the main pipeline's: one copy
            shared = os.path.join(out, name, part)
            if not os.path.islink(shared):
                shutil.rmtree(shared)
                os.symlink(os.path.join("..", "pipeline", part), shared)
    _log(t0, f"saved to {out}")


if __name__ == "__main__":
    build(*sys.argv[1:2], scale=float(sys.argv[2]) if len(sys.argv) > 2 else 1.0)
