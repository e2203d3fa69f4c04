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
- The one-off builder of the committed assets (models, prompts): assets/tinyworld/build.py. The reference
  images are not committed: `write_references` renders them (`python tinyworld.py`, run by make demo / test).

Departs from GenEval
- GenEval detects objects with a Mask2Former and judges colour with CLIP; here every image is a flat
  background plus flat shapes, so exact pixel rules replace both and the score has no model error.
- Shape is judged by angular moments of the anti-aliased mask, not by bounding-box corners: at 32 px a
  small triangle is ~6 px wide and its bounding box quantises to whole pixels. A triangle has a 3-fold
  harmonic, a square a 4-fold one, a circle neither (see `_shape_of`).
"""

import itertools
import json
import os
import shutil
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


def render(scene: Scene, size: int = 32, style: str = "light", rng: np.random.Generator | None = None,
           specks: int = 0):
    """One RGB PIL image (size x size). With `rng`, the centre moves by up to ±3% of the side per axis
    (±1 px at 32) and the object is scaled by 0.9..1.1, so references of one prompt are not all identical.
    `specks` > 0 (needs `rng`) adds that many stray blobs of paint: the flawed renders of the "flawed base"
    (assets/tinyworld/build.py), see `draw_specks`."""
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
    else:  # equilateral, apex up, centroid at (x, y)
        R = 1.2 * r  # circumradius 1.2 r: a bit more than half the circle's area
        draw.polygon([(x, y - R), (x - R * 0.866, y + R / 2), (x + R * 0.866, y + R / 2)], fill=fill)
    if specks:
        draw_specks(draw, S, (x, y), 1.2 * r, scene.colour, style, specks, rng)
    return img.resize((size, size), Image.LANCZOS)


SPECK_RADIUS = (0.09, 0.12)  # of the side: 3-4 px at 32, an area of 25-45 px, well above MIN_AREA


def draw_specks(draw, S, centre, extent, colour, style, n, rng):
    """n stray blobs of paint on an S x S canvas, each a small disk clear of the object (centre, extent:
    its circumradius) by at least a speck's diameter, half of them the object's colour (a fragment) and
    half another palette colour (a splash). The flaw a prompt-blind eye sees at once (the references never
    have it) and that toy GenEval counts (a second object: count wrong)."""
    names = list(COLOURS)
    for _ in range(n):
        rad = rng.uniform(*SPECK_RADIUS) * S
        for _ in range(100):  # rejection sampling of a free spot inside the canvas
            px, py = rng.uniform(rad + 1, S - rad - 1, size=2)
            if np.hypot(px - centre[0], py - centre[1]) > extent + 3 * rad:
                break
        c = colour if rng.random() < 0.5 else names[(names.index(colour) + rng.integers(1, len(names)))
                                                    % len(names)]
        draw.ellipse([px - rad, py - rad, px + rad, py + rad], fill=palette(style)[c])


def to_tensor(img: Image.Image) -> torch.Tensor:
    # (3, H, W)
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def render_batch(scenes: list[Scene], size: int = 32, style: str = "light", seed: int = 0) -> torch.Tensor:
    """Jittered renders of `scenes`, a pure function of its arguments.
    Returns (B, 3, size, size) in [0, 1]."""
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
    """Mean of `analyse` over a batch (B, 3, H, W):
    dict(colour, shape, position, count, correct) of floats."""
    rows = [analyse(im, p) for im, p in zip(images, prompts, strict=True)]
    return {k: float(np.mean([r[k] for r in rows]))
            for k in ("colour", "shape", "position", "count", "correct")}


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
# The references, rendered from the grammar (the same bytes on every machine: a test pins their hash)

REF_STYLES, N_REFS = ("dark", "light"), 4
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tinyworld")


def write_references(out=ASSETS):
    """out/refs_<style>/: N_REFS jittered 32-px renders of every prompt (train and held-out) and index.json
    {prompt: [file names]}, the published format (config/tiny.py: light; config/tiny_style.py: dark). About a
    second; a folder already there is kept. Each is written beside and renamed into place: a concurrent
    caller (a second test worker) never reads half a set."""
    for style in REF_STYLES:
        final = os.path.join(out, f"refs_{style}")
        if os.path.isdir(final):
            continue
        tmp, rng, index = f"{final}.tmp{os.getpid()}", np.random.default_rng(30), {}
        os.makedirs(tmp)
        for k, scene in enumerate(all_scenes()):
            index[prompt_of(scene)] = [f"{k:03d}_{j}.png" for j in range(N_REFS)]
            for name in index[prompt_of(scene)]:
                render(scene, 32, style, rng).save(os.path.join(tmp, name), optimize=True)
        with open(os.path.join(tmp, "index.json"), "w") as f:
            json.dump(index, f, indent=0)
        try:
            os.rename(tmp, final)
        except OSError:  # another process was first; its set is the same
            shutil.rmtree(tmp)


if __name__ == "__main__":
    write_references()
