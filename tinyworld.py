"""
tinyworld.py — the shapes world: a toy text-to-image world small enough to run and *measure* Adv-GRPO
exactly on a laptop.

Owns
- The prompt grammar: "a [small|large] <colour> <shape> <where>", e.g. "a red circle on the left",
  "a large blue square at the top". `Scene`, `parse`, `prompt_of`, `all_scenes`, `split`.
- The renderer: `render` (one PIL image) and `render_batch` (a float tensor in [0,1]), drawn with PIL at
  4x and downsampled with LANCZOS, with optional jitter of position and size, in one of three global
  `STYLES` — the "distribution" that the adversarial reward can transfer.
- The exact analyser, a toy GenEval: `measure` reads colour, shape, position and object count from pixels
  alone; `analyse` compares that with a prompt; `accuracy` averages over a batch. `style_stats` gives the
  global style measures (background brightness, foreground saturation) used as held-out style metrics.

Leaves out
- Image size ("small"/"large") is drawn but not judged: like GenEval we score what the prompt names about
  identity and layout; size is there to make the world less trivially memorised.
- Owns too: the builder of the committed assets (`python tinyworld.py build`), at the end of the file.

Departs from GenEval (and from an earlier prototype of this world)
- GenEval detects objects with a Mask2Former and judges colour with CLIP; here every image is a flat
  background plus flat shapes, so exact pixel rules replace both and the score has no model error.
- The prototype judged shape by bounding-box corners. At 32 px a small triangle is ~6 px wide and the
  bounding box quantises to whole pixels, so we use angular moments of the anti-aliased mask instead:
  a triangle has a 3-fold harmonic, a square a 4-fold one, a circle neither (see `_shape_of`).
"""

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

# -----------------------------------------------------------------------------------------------
# The grammar

# Hues ~60° apart (red 0°, yellow 50°, green 120°, cyan 183°, blue 225°, purple 285°), all far from
# both white and black so every colour stands out on every style's background.
COLOURS = {
    "red": (220, 30, 30),
    "yellow": (240, 200, 0),
    "green": (30, 170, 30),
    "cyan": (0, 190, 200),
    "blue": (30, 60, 220),
    "purple": (140, 40, 180),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {  # name -> (phrase, centre of the object as a fraction of the image (x, y))
    "left": ("on the left", (0.26, 0.5)),
    "right": ("on the right", (0.74, 0.5)),
    "top": ("at the top", (0.5, 0.26)),
    "bottom": ("at the bottom", (0.5, 0.74)),
    "centre": ("in the centre", (0.5, 0.5)),
}
SIZES = {"small": 0.1, "medium": 0.125, "large": 0.16}  # half-extent of the object / image side

# A style is a global look: background colour and how far the palette is pulled toward grey.
#   light: near-white background, pure palette (what the base model is trained on)
#   dark:  near-black background, the same pure palette (the distribution-transfer target)
#   muted: light-grey background, palette 40% of the way to mid-grey (less saturated, a second target)
STYLES = {
    "light": dict(background=(245, 245, 245), grey=0.0),
    "dark": dict(background=(20, 20, 20), grey=0.0),
    "muted": dict(background=(200, 200, 200), grey=0.4),
}


def palette(style: str) -> dict:
    """colour name -> RGB (0..255) as drawn in `style`."""
    g = STYLES[style]["grey"]
    return {k: tuple(round((1 - g) * c + g * 128) for c in rgb) for k, rgb in COLOURS.items()}


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    position: str
    size: str = "medium"


def prompt_of(scene: Scene) -> str:
    size = "" if scene.size == "medium" else scene.size + " "
    return f"a {size}{scene.colour} {scene.shape} {POSITIONS[scene.position][0]}"


def all_scenes() -> list[Scene]:
    """Every scene of the world: 6 colours x 3 shapes x 5 positions x 3 sizes = 270, in a fixed order."""
    return [Scene(c, s, p, z) for c, s, p, z in itertools.product(COLOURS, SHAPES, POSITIONS, SIZES)]


_SCENE_OF = {prompt_of(s): s for s in all_scenes()}  # the grammar is finite: parsing is a lookup


def parse(prompt: str) -> Scene:
    """The scene a prompt describes. Case and runs of whitespace are ignored; anything else must match."""
    scene = _SCENE_OF.get(" ".join(prompt.lower().split()))
    if scene is None:
        raise ValueError(f"prompt {prompt!r} is not in the shapes-world grammar: 'a [small|large] <colour> "
                         "<shape> <on the left|...>', e.g. 'a large blue square at the top'")
    return scene


def split(held_out: int = 18, seed: int = 0) -> tuple[list[Scene], list[Scene]]:
    """(train_scenes, test_scenes). `held_out` counts (colour, shape, position) combinations; every size of
    a held-out combination goes to test. A combination is held out only if each of its three pairs
    (colour+shape, colour+position, shape+position) still occurs in train, so the test set asks for new
    *compositions* of words the model has seen together in pairs, never for an unseen word."""
    combos = list(itertools.product(COLOURS, SHAPES, POSITIONS))
    order = np.random.default_rng(seed).permutation(len(combos))
    pairs = lambda c, s, p: [("cs", c, s), ("cp", c, p), ("sp", s, p)]
    left = {}  # how many train combinations still contain each pair
    for combo in combos:
        for pair in pairs(*combo):
            left[pair] = left.get(pair, 0) + 1
    test = set()
    for i in order:
        if len(test) == held_out:
            break
        if all(left[pair] > 1 for pair in pairs(*combos[i])):
            test.add(combos[i])
            for pair in pairs(*combos[i]):
                left[pair] -= 1
    if len(test) < held_out:
        raise ValueError(f"cannot hold out {held_out} combinations and keep every pair in train")
    train = [s for s in all_scenes() if (s.colour, s.shape, s.position) not in test]
    return train, [s for s in all_scenes() if (s.colour, s.shape, s.position) in test]


# -----------------------------------------------------------------------------------------------
# The renderer

SUPERSAMPLE = 4  # draw at 4x, downsample with LANCZOS: clean anti-aliased edges at 32 px


def render(scene: Scene, size: int = 32, style: str = "light", rng: np.random.Generator | None = None):
    """One RGB PIL image (size x size). With `rng`, the centre moves by up to ±3% of the side per axis
    (±1 px at 32) and the object is scaled by 0.9..1.1, so references of one prompt are not all identical."""
    dx = dy = 0.0
    scale = 1.0
    if rng is not None:
        dx, dy = rng.uniform(-0.03, 0.03, size=2)
        scale = rng.uniform(0.9, 1.1)
    S = size * SUPERSAMPLE
    fx, fy = POSITIONS[scene.position][1]
    x, y = (fx + dx) * S, (fy + dy) * S
    r = SIZES[scene.size] * scale * S
    img = Image.new("RGB", (S, S), STYLES[style]["background"])
    draw, fill = ImageDraw.Draw(img), palette(style)[scene.colour]
    if scene.shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif scene.shape == "square":  # half-side 0.9 r: about the circle's area
        h = 0.9 * r
        draw.rectangle([x - h, y - h, x + h, y + h], fill=fill)
    else:  # equilateral, apex up, centroid at (x, y); circumradius 1.2 r: a bit more than half the circle's area
        R = 1.2 * r
        draw.polygon([(x, y - R), (x - R * 0.866, y + R / 2), (x + R * 0.866, y + R / 2)], fill=fill)
    return img.resize((size, size), Image.LANCZOS)


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)


def render_batch(scenes: list[Scene], size: int = 32, style: str = "light", seed: int = 0) -> torch.Tensor:
    """Jittered renders of `scenes`, a pure function of its arguments. Returns (B, 3, size, size) in [0, 1]."""
    rng = np.random.default_rng(seed)
    return torch.stack([to_tensor(render(s, size, style, rng)) for s in scenes])


# -----------------------------------------------------------------------------------------------
# The exact analyser ("toy GenEval")

# A pixel is foreground when its RGB distance (in [0,1] units) to the background exceeds this: about half
# the smallest colour/background contrast of any style (muted purple on muted grey 0.58, green on dark
# 0.59), and far above pixel noise of std 0.05 (its distance exceeds 0.3 with probability 7e-8).
FG_DISTANCE = 0.3
MIN_AREA = 0.004  # components smaller than this fraction of the image are noise (4 px at 32, 9 px at 48)
CENTRE_BOX = 0.12  # centroid within ±12% of the image centre on both axes -> "centre" (objects sit at ±24%)
# colour references: the pure and the muted version of every colour, each mapped back to its name
_REF_NAMES = [k for st in ("light", "muted") for k in palette(st)]
_REF_RGB = np.array([v for st in ("light", "muted") for v in palette(st).values()], dtype=np.float32) / 255.0


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    return image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()  # (3, H, W) -> (H, W, 3)


def _border(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x[0], x[-1], x[1:-1, 0], x[1:-1, -1]])  # (2H + 2W - 4, 3)


def _components(mask: np.ndarray) -> np.ndarray:
    """8-connected labels of a boolean (H, W) mask: each pixel repeatedly takes the smallest label among its
    neighbours until nothing changes (a flood fill, vectorised). Background is -1."""
    H, W = mask.shape
    big = H * W
    lab = np.where(mask, np.arange(big).reshape(H, W), big)
    while True:
        p = np.pad(lab, 1, constant_values=big)
        nb = np.min([p[i:i + H, j:j + W] for i in range(3) for j in range(3)], axis=0)
        new = np.where(mask, nb, big)
        if np.array_equal(new, lab):
            return np.where(mask, lab, -1)
        lab = new


def _shape_of(alpha: np.ndarray) -> str:
    """Shape from angular harmonics of the soft mask about its centroid, z = (x - cx) + i(y - cy):
    h_k = |sum a z^k| / sum a |z|^k. An equilateral triangle has h3 ≈ 0.65 and h4 ≈ 0, a square h4 ≈ 0.43
    and h3 = 0, a circle both ≈ 0 (h4 up to 0.15 for a pixelated 6-px disk). Measured on renders (all
    sizes, 32-64 px): triangles h3 ≥ 0.50, squares h4 ≥ 0.27, circles h3 ≤ 0.06, h4 ≤ 0.16 — hence the
    thresholds. No bounding box, so whole-pixel quantisation of tiny shapes matters less, and the measure
    is rotation invariant. Blur shrinks both harmonics, so a blurred small square or triangle reads as a
    circle: the graceful failure we want for blobby generations."""
    ys, xs = np.nonzero(alpha)
    a = alpha[ys, xs]
    z = (xs + 0.5) + 1j * (ys + 0.5)
    z = z - (a * z).sum() / a.sum()
    h3 = abs((a * z**3).sum()) / (a * abs(z) ** 3).sum()
    h4 = abs((a * z**4).sum()) / (a * abs(z) ** 4).sum()
    if h3 > max(h4, 0.3):
        return "triangle"
    return "square" if h4 > 0.22 else "circle"


def measure(image) -> dict:
    """What the image shows, from pixels alone: dict(count, colour, shape, position). colour/shape/position
    describe the largest object and are None when there is none (count 0). Never raises on odd images."""
    x = _as_array(image)  # (H, W, 3)
    H, W, _ = x.shape
    bg = np.median(_border(x), axis=0)  # (3,) the background is what most of the border shows
    dist = np.linalg.norm(x - bg, axis=-1)  # (H, W)
    lab = _components(dist > FG_DISTANCE)
    ids, areas = np.unique(lab[lab >= 0], return_counts=True)
    keep = areas >= max(3, MIN_AREA * H * W)
    ids, areas = ids[keep], areas[keep]
    if len(ids) == 0:
        return dict(count=0, colour=None, shape=None, position=None)
    obj = lab == ids[np.argmax(areas)]  # (H, W) the largest object
    # colour: median of its most distinct pixels (the core, not the anti-aliased rim), nearest reference
    core = obj & (dist >= 0.8 * dist[obj].max())
    rgb = np.median(x[core], axis=0)
    colour = _REF_NAMES[int(np.argmin(np.linalg.norm(_REF_RGB - rgb, axis=-1)))]
    # soft mask: 0 on background, 1 on the object's colour, in between on the rim; the rim is the object's
    # 8-neighbourhood, so anti-aliased edge pixels below the threshold still count (by their fraction)
    rim = np.pad(obj, 1)
    rim = np.max([rim[i:i + H, j:j + W] for i in range(3) for j in range(3)], axis=0)
    alpha = np.where(rim, np.clip(dist / max(np.linalg.norm(rgb - bg), 1e-6), 0, 1), 0.0)
    ys, xs = np.nonzero(alpha)
    a = alpha[ys, xs]
    cx, cy = (a * (xs + 0.5)).sum() / a.sum() / W - 0.5, (a * (ys + 0.5)).sum() / a.sum() / H - 0.5
    if max(abs(cx), abs(cy)) < CENTRE_BOX:
        position = "centre"
    elif abs(cx) >= abs(cy):
        position = "left" if cx < 0 else "right"
    else:
        position = "top" if cy < 0 else "bottom"
    return dict(count=len(ids), colour=colour, shape=_shape_of(alpha), position=position)


def analyse(image, prompt: str) -> dict:
    """Judge one image (tensor (3, H, W) in [0, 1] or PIL) against its prompt, GenEval style.
    Returns dict(colour, shape, position, count, correct) of bools; correct = all four. With no object every
    attribute is False; with several, count is False and the rest judge the largest."""
    want, got = parse(prompt), measure(image)
    r = dict(colour=got["colour"] == want.colour, shape=got["shape"] == want.shape,
             position=got["position"] == want.position, count=got["count"] == 1)
    r["correct"] = all(r.values())
    return r


def accuracy(images: torch.Tensor, prompts: list[str]) -> dict:
    """Mean of `analyse` over a batch (B, 3, H, W): dict(colour, shape, position, count, correct) of floats."""
    rows = [analyse(im, p) for im, p in zip(images, prompts, strict=True)]
    return {k: float(np.mean([r[k] for r in rows])) for k in ("colour", "shape", "position", "count", "correct")}


def style_stats(images: torch.Tensor) -> dict:
    """Global style of each image in a batch (B, 3, H, W), independent of the prompt:
    - background_brightness: mean over the one-pixel border of (R+G+B)/3; light 0.96, muted 0.78, dark 0.08.
    - saturation: mean HSV saturation (max-min)/max over the objects' cores (foreground pixels at least half
      as far from the background as the farthest one; the anti-aliased rim would mix in the background's
      grey); 0 with no foreground. Means over all renders: light 0.85, dark 0.88, muted 0.61. A given scene
      is always ≥ 0.16 less saturated in muted than in light, but hues differ (pure purple 0.77, muted
      yellow 0.74), so compare batch means or paired images, not single images of different colours.
    Returns dict of float tensors (B,)."""
    bright, sat = [], []
    for im in images:
        x = _as_array(im)
        border = _border(x)
        bright.append(border.mean())
        dist = np.linalg.norm(x - np.median(border, axis=0), axis=-1)  # (H, W)
        fg = x[(dist > FG_DISTANCE) & (dist >= 0.5 * dist.max())]  # (N, 3) objects' cores, not their rims
        s = (fg.max(-1) - fg.min(-1)) / np.maximum(fg.max(-1), 1e-6)
        sat.append(s.mean() if len(fg) else 0.0)
    return dict(background_brightness=torch.tensor(bright, dtype=torch.float32),
                saturation=torch.tensor(sat, dtype=torch.float32))


# -----------------------------------------------------------------------------------------------
# The builder of the committed assets: `python tinyworld.py build` (deterministic, ~30-40 min on 2 cores)
#
#   assets/tinyworld/pipeline/        a StableDiffusion3Pipeline folder (no T5): tiny VAE (32² → 4×16²),
#                                     tiny MMDiT trained by flow matching on renders of the train prompts,
#                                     90% light and 10% dark, two frozen random CLIP text encoders with a word-level
#                                     CLIP BPE tokenizer generated from the grammar
#   assets/tinyworld/backbone.safetensors   a tiny DINOv2-style timm ViT trained to name colour, shape,
#                                     position and style: the stand-in for DINOv2 (features that see both
#                                     content and style; a random ViT's CLS is
#                                     near-identical for every image, cosine ≈ 0.99)
#   assets/tinyworld/{train,test}.txt        prompts: 216 train scenes, 54 held-out (18 combinations × 3 sizes)
#   assets/tinyworld/refs_<style>/           4 references per prompt + index.json (the published format)
#
# Why light → dark: a prototype of this world measured that global properties move within minutes under Adv-GRPO while
# shape faithfulness does not, so the demo's main setting is distribution transfer (the paper's style-
# customisation claim): the base mostly draws light backgrounds, the references are all dark.

BACKBONE = dict(model="vit_small_patch14_dinov2", img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4,
                init_values=1.0)  # init_values=1: DINOv2's LayerScale 1e-5 would make a small ViT train slowly
REF_STYLES = ("dark", "light")
DARK_FRAC = 0.1  # share of dark renders in the base's training set
N_REFS = 4


def backbone_kwargs():
    """timm.create_model kwargs of the tiny backbone (the `dino_kwargs` of config/tiny.py)."""
    return {k: v for k, v in BACKBONE.items() if k not in ("model", "img_size")}


def _words():
    return sorted({w for s in all_scenes() for w in prompt_of(s).split()})


def _log(t0, msg):
    import time
    print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)


def _render_pool(scenes, n_jitter, style, seed):
    """Every scene rendered n_jitter times with jitter: (len(scenes)·n_jitter, 3, 32, 32) and prompts."""
    rng = np.random.default_rng(seed)
    imgs = torch.stack([to_tensor(render(s, 32, style, rng)) for s in scenes for _ in range(n_jitter)])
    return imgs, [prompt_of(s) for s in scenes for _ in range(n_jitter)]


def build_vae(t0, steps=1200):
    """A factor-2 AutoencoderKL trained on all three styles (the VAE must be able to draw the target
    style even though the base transformer never sees it)."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
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
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            projection_dim=32, max_position_embeddings=16, hidden_act="quick_gelu", bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)).eval())
    return tok, encs


def build_transformer(t0, pipe, train_scenes, steps=2000, dark_frac=0.0, lr=1e-3, init=None, seed=1):
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
                                   caption_projection_dim=128, pooled_projection_dim=64, pos_embed_max_size=16)
    pipe.register_modules(transformer=tr)  # encode_prompt reads joint_attention_dim from it
    enc = PromptEncoder(pipe, "cpu", max_sequence_length=1)
    imgs, prompts = _render_pool(train_scenes, 24, "light", seed)
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
    vit = timm.create_model(BACKBONE["model"], pretrained=False, num_classes=0, img_size=32, **backbone_kwargs())
    names = [list(COLOURS), list(SHAPES), list(POSITIONS), list(STYLES)]
    heads = torch.nn.ModuleList(torch.nn.Linear(vit.num_features, len(n)) for n in names)
    scenes = all_scenes()
    data, labels = [], []
    for i, st in enumerate(STYLES):
        rng = np.random.default_rng(20 + i)
        for s in scenes:
            for _ in range(2):
                data.append(to_tensor(render(s, 32, st, rng)))
                labels.append([names[0].index(s.colour), names[1].index(s.shape), names[2].index(s.position), i])
    data, labels = torch.stack(data), torch.tensor(labels)
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    opt = torch.optim.AdamW([*vit.parameters(), *heads.parameters()], lr=1e-3)
    g = torch.Generator().manual_seed(2)
    for step in range(steps):
        i = torch.randint(len(data), (64,), generator=g)
        x = data[i] + 0.05 * torch.randn(data[i].shape, generator=g)                # noise: generations are noisy
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
    import json
    import os
    import time
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from safetensors.torch import save_file
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    train_scenes, test_scenes = split()
    for name, sc in (("train", train_scenes), ("test", test_scenes)):
        with open(os.path.join(out, f"{name}.txt"), "w") as f:
            f.write("\n".join(prompt_of(s) for s in sc) + "\n")
    for st in REF_STYLES:  # references: N_REFS jittered renders per prompt, train and test (~1 s)
        d = os.path.join(out, f"refs_{st}")
        os.makedirs(d, exist_ok=True)
        rng, index = np.random.default_rng(30), {}
        for k, s in enumerate(all_scenes()):
            index[prompt_of(s)] = []
            for j in range(N_REFS):
                fn = f"{k:03d}_{j}.png"
                render(s, 32, st, rng).save(os.path.join(d, fn), optimize=True)
                index[prompt_of(s)].append(fn)
        with open(os.path.join(d, "index.json"), "w") as f:
            json.dump(index, f, indent=0)
    _log(t0, "prompts and references written")
    # Each stage is skipped when its output exists (every stage is seeded, so a rerun after an
    # interruption gives the same assets as one uninterrupted build).
    if not os.path.exists(os.path.join(out, "backbone.safetensors")):
        backbone = build_backbone(t0, steps=max(2, int(800 * scale)))
        save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, os.path.join(out, "backbone.safetensors"))
    if os.path.isdir(os.path.join(out, "pipeline", "vae")):
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(os.path.join(out, "pipeline", "vae"))
    else:
        vae = build_vae(t0, steps=max(2, int(1200 * scale)))
    tok, (te1, te2) = build_text_encoders()
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=vae, text_encoder=te1,
                                    tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok, text_encoder_3=None,
                                    tokenizer_3=None, transformer=None)
    # A DARK_FRAC share of the base's training renders are dark, so it draws a dark background now and
    # then, unprompted. Adv-GRPO can only reweight what the policy ever samples: a light-only base gives
    # every group the same background and its adversarial reward then pushes elsewhere (measured:
    # background flat, content collapsing). The paper's premise is the same: SD3.5 can draw the
    # references' style, rarely; Adv-GRPO makes it the norm.
    tr = build_transformer(t0, pipe, train_scenes, steps=max(2, int(2000 * scale)), dark_frac=DARK_FRAC)
    pipe.register_modules(transformer=tr.half())  # fp16 on disk halves the size; training loads float32
    pipe.save_pretrained(os.path.join(out, "pipeline"))
    from model import SETTINGS_FILE  # what diffusers cannot know: the text length it was trained with
    with open(os.path.join(out, "pipeline", SETTINGS_FILE), "w") as f:
        json.dump(dict(max_sequence_length=1, resolution=32), f)
    _log(t0, f"saved to {out}")


if __name__ == "__main__":
    import sys
    if sys.argv[1:2] == ["build"]:
        build(*sys.argv[2:3], scale=float(sys.argv[3]) if len(sys.argv) > 3 else 1.0)
    else:
        print("usage: python tinyworld.py build [OUT [SCALE]]   # writes assets/tinyworld/ (~35 min on 2 cores)")
