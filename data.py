"""
data.py — what the run trains on: prompt sets, the reference images, and who generates what.

Owns
- `load_prompts(path)`: a `.txt` (one prompt a line) or `.jsonl` (`{"prompt": ..., **metadata}`) file,
  validated line by line; every error names the file and the 1-based line.
- `epoch_prompt_indices(...)`: which prompts an epoch uses, a pure function of (sizes, epoch, seed), so
  every rank computes the same list with no communication and a resumed run draws the same prompts.
- `assign_samples(...)`: each prompt repeated `group_size` times (a group is contiguous), and the
  contiguous slice of that list that one rank generates.
- `ReferenceSet`: the "real" images of the adversarial reward, from the published index
  `{prompt: [relative image paths]}` or from a folder (style transfer: every image is real for every
  prompt), loaded eagerly, checked, and stored as uint8 (N, 3, H, W).

Leaves out: DDP calls (train.py passes rank and world size in), text encoding (model.py), anything
that scores images (reward.py), making and importing data sets offline (prepare.py).

Departs from the published Flow-GRPO / Adv-GRPO code
- Flow-GRPO's txt loader (`line.strip()` per line) turns a blank line into the prompt "" without a word; we
  refuse blank lines and name the line.
- Its `DistributedKRepeatSampler` seeds with `seed + epoch` (so seed 1 / epoch 0 replays seed 0 /
  epoch 1) and takes `randperm(n)[:m]`, which silently yields fewer prompts when m > n. We seed with the
  pair [seed, epoch] and concatenate permutations when more prompts are asked for than exist.
- It also shuffles the P*G samples before splitting them across ranks; we keep each group contiguous.
  Nothing depends on the order (advantages use the rewards of all ranks), and contiguous groups make
  "which rank drew what" readable in logs and let a rank reuse one prompt embedding for a whole group.
- Every reference image is decoded, converted and resized once, at start-up: a missing or corrupt file
  fails before the first (expensive) epoch, naming the file and its prompt, and no epoch pays for decoding.
"""

import json
import math
import os
import re
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# -----------------------------------------------------------------------------------------------
# Prompts


def load_prompts(path: str) -> list[dict]:
    """Read prompts from `.txt` (one a line) or `.jsonl` (metadata keys kept).
    Returns [{"prompt": str, ...}]."""
    if not os.path.isfile(path):
        raise ValueError(f"prompt file {path} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".txt", ".jsonl"):
        raise ValueError(f"prompt file {path}: unknown extension {ext!r}; use .txt (one prompt a line) "
                         "or .jsonl")
    # utf-8-sig: a byte-order mark is not part of the first prompt. Split on \n, \r\n and a lone \r only:
    # str.splitlines would also split inside a prompt at a form feed, or inside a JSON string at U+2028.
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            lines = re.split(r"\r\n|\r|\n", f.read())
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt file {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    if lines and lines[-1] == "":
        lines.pop()  # a final newline does not make an extra (empty) line
    prompts = []
    for lineno, line in enumerate(lines, start=1):
        where = f"{path}:{lineno}"
        if "\0" in line:
            raise ValueError(f"{where}: a NUL byte inside the prompt (a binary or UTF-16 file?)")
        if not line.strip():
            # A blank line would silently become the empty prompt "" — the CFG unconditional input —
            # and its group would be trained towards "any image". Refuse rather than guess.
            raise ValueError(f"{where}: blank line (it would become the empty prompt); remove it")
        if ext == ".txt":
            prompts.append({"prompt": line.strip()})  # strip like Flow-GRPO's txt loader
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: bad JSON at column {e.colno}: {e.msg}") from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise ValueError(f'{where}: expected a JSON object with a string "prompt" key, got {line[:80]!r}')
        if not item["prompt"].strip():
            raise ValueError(f'{where}: "prompt" is blank (it would become the empty prompt)')
        prompts.append(item)
    if not prompts:
        raise ValueError(f"prompt file {path} is empty (no prompts)")
    return prompts


def epoch_prompt_indices(n_prompts: int, prompts_per_epoch: int, epoch: int, seed: int) -> list[int]:
    """The prompt indices epoch `epoch` uses: without replacement when prompts_per_epoch <= n_prompts,
    otherwise whole permutations back to back (every prompt used before any is used twice)."""
    if n_prompts < 1 or prompts_per_epoch < 1:
        raise ValueError(f"need n_prompts >= 1 and prompts_per_epoch >= 1, got {n_prompts} and "
                         f"{prompts_per_epoch}")
    # A local generator keyed on (seed, epoch) only: no global RNG state, so all ranks agree and a
    # resumed run redraws exactly what the interrupted one would have.
    rng = np.random.default_rng([seed, epoch])
    n_perms = math.ceil(prompts_per_epoch / n_prompts)
    return np.concatenate([rng.permutation(n_prompts) for _ in range(n_perms)])[:prompts_per_epoch].tolist()


def assign_samples(prompt_indices: list[int], group_size: int, world_size: int,
                   rank: int) -> tuple[list[int], slice]:
    """All P*G samples of the epoch (prompt index per image, groups contiguous) and this rank's slice."""
    P, G, W = len(prompt_indices), group_size, world_size
    if G < 1 or W < 1 or not 0 <= rank < W:
        raise ValueError(f"need group_size >= 1 and 0 <= rank < world_size, got {G}, rank {rank}, world {W}")
    if (P * G) % W:
        p_step, g_step = W // math.gcd(G, W), W // math.gcd(P, W)  # smallest valid multiples
        raise ValueError(
            f"prompts_per_epoch ({P}) * group_size ({G}) = {P * G} images cannot be split evenly over "
            f"world size {W}: make prompts_per_epoch a multiple of {p_step} "
            f"(e.g. {max(p_step, P // p_step * p_step)}"
            f" or {(P // p_step + 1) * p_step}) or group_size a multiple of {g_step} "
            f"(e.g. {max(g_step, G // g_step * g_step)} or {(G // g_step + 1) * g_step})")
    samples = [i for i in prompt_indices for _ in range(G)]  # (P*G,) group g = samples[g*G:(g+1)*G]
    n = P * G // W
    return samples, slice(rank * n, (rank + 1) * n)

# -----------------------------------------------------------------------------------------------
# Reference images


def _load_image(path: str, size: int | None) -> torch.Tensor:
    """One image file -> uint8 (3, H, W), RGB, optionally resized and center-cropped to size x size."""
    if not os.path.isfile(path):
        raise ValueError(f"reference image {path} does not exist")
    if os.path.getsize(path) == 0:
        raise ValueError(f"reference image {path} is empty (0 bytes)")
    try:
        with Image.open(path) as im:
            im.load()  # open() reads only the header: decode inside this try so truncated data fails here
            im = ImageOps.exif_transpose(im)  # a camera's rotation flag: the picture as people see it
            # 16/32-bit or float grayscale: convert("RGB") would clip to white (floats in 0..1: black), scale
            if im.mode.startswith("I") or im.mode == "F":
                a = np.asarray(im, dtype=np.float64)
                a = (a * 255 if im.mode == "F" and a.max() <= 1 else
                     a / 257 if im.mode.startswith("I;16") or a.max() > 255 else a)
                im = Image.fromarray(a.round().clip(0, 255).astype(np.uint8), "L")
            if "A" in im.getbands() or "transparency" in im.info:
                # convert("RGB") would just drop alpha and expose whatever colour the transparent pixels
                # happen to store (often black). The discriminator would learn that as "real", so
                # composite onto white, the background such images are shown on.
                im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)),
                                           im.convert("RGBA"))
            im = im.convert("RGB")  # grayscale, palette, CMYK, RGBA-on-white -> RGB
    except Exception as e:  # PIL raises many types for corrupt data (OSError, SyntaxError, struct.error...)
        raise ValueError(f"reference image {path} cannot be read: {e}") from None
    if size is not None:
        # Centre square crop, then bicubic resize: the same as "resize the short side, centre-crop".
        # PIL widens the bicubic kernel when shrinking, i.e. it antialiases (torchvision antialias=True).
        im = ImageOps.fit(im, (size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous()  # (3, H, W) uint8


class ReferenceSet:
    """Reference ("real") images, by prompt or for every prompt.

    `groups` maps a prompt to its image paths; the single key None means folder mode: the images are
    real for every prompt. Then `.prompts` is None ("all prompts", not "no prompt") and `.missing()` is [].
    Images are kept once each as uint8 in `self.images` (N, 3, H, W): 0.75 MB per 512^2 image.
    """

    def __init__(self, groups: dict[str | None, list[str]], size: int | None = None, skip_bad: bool = False,
                 source: str = "the reference set"):  # source: the index or folder, for messages
        self.folder_mode = None in groups
        self.skipped: list[str] = []
        self.files: list[str] = []              # self.files[i] is the file of self.images[i]
        self._index: dict[str | None, list[int]] = {}  # prompt -> rows of self.images
        row_of: dict[str, int | None] = {}      # a file listed by several prompts is loaded once
        images = []
        for prompt, paths in groups.items():
            for path in paths:
                if path not in row_of:
                    try:
                        images.append(_load_image(path, size))
                        self.files.append(path)
                        row_of[path] = len(images) - 1
                    except ValueError as e:
                        if not skip_bad:
                            listed = ("" if self.folder_mode
                                      else f" (listed for prompt {prompt!r} in {source})")
                            raise ValueError(f"{e}{listed}; skip_bad=True drops such files") from None
                        self.skipped.append(path)
                        row_of[path] = None
                if row_of[path] is not None:
                    self._index.setdefault(prompt, []).append(row_of[path])
        # A prompt whose every image was dropped gets no entry, so .missing() reports it to train.py.
        if self.skipped:
            lost = [p for p in groups if p not in self._index]
            warnings.warn(f"{source}: skipped {len(self.skipped)} unreadable reference image(s), e.g. "
                          f"{self.skipped[0]}; {len(lost)} prompt(s) lost all references", stacklevel=3)
        if not images:
            raise ValueError(f"{source}: no reference images left"
                             + (" (all were unreadable)" if self.skipped else ""))
        for path, im in zip(self.files, images):
            if im.shape != images[0].shape:
                raise ValueError(f"reference images differ in size: {self.files[0]} is "
                                 f"{tuple(images[0].shape[1:])} (H, W) but {path} is {tuple(im.shape[1:])}; "
                                 f"pass size=... to resize them all")
        self.images = torch.stack(images)  # (N, 3, H, W) uint8

    @classmethod
    def from_index(cls, index_json: str, root: str | None = None, size: int | None = None,
                   skip_bad: bool = False):
        """The published format: JSON {prompt: [image paths relative to root (default: its folder)]}."""
        if not os.path.isfile(index_json):  # the shapes world's are rendered, not committed: say by what
            raise ValueError(f"reference index {index_json} does not exist" + ("tinyworld" in index_json) *
                             " (`python tinyworld.py` renders the shapes world's; make demo / test run it)")
        with open(index_json, encoding="utf-8") as f:
            try:
                index = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"reference index {index_json}: bad JSON at line {e.lineno}, "
                                 f"column {e.colno}: {e.msg}") from None
            except UnicodeDecodeError as e:
                raise ValueError(f"reference index {index_json} is not UTF-8 text ({e.reason})") from None
            except RecursionError:
                raise ValueError(f"reference index {index_json}: nested too deeply to be an index "
                                 "{prompt: [image paths]}") from None
        if not isinstance(index, dict):
            raise ValueError(f"reference index {index_json}: expected a JSON object "
                             f"{{prompt: [image paths]}}, got a {type(index).__name__}")
        for prompt, paths in index.items():
            if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
                raise ValueError(f"reference index {index_json}: key {prompt!r} must map to a list of "
                                 "path strings")
        root = os.path.dirname(os.path.abspath(index_json)) if root is None else root
        groups = {prompt: [os.path.join(root, p) for p in paths] for prompt, paths in index.items()}
        return cls(groups, size, skip_bad, source=index_json)

    @classmethod
    def from_folder(cls, folder: str, size: int | None = None, skip_bad: bool = False):
        """Style transfer: every image in `folder` (not recursive) is real for every prompt."""
        if not os.path.isdir(folder):
            raise ValueError(f"reference folder {folder} does not exist")
        # sorted: listdir order depends on the filesystem, and row order must not (determinism of .sample)
        names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
        if not names:
            raise ValueError(f"reference folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        return cls({None: [os.path.join(folder, n) for n in names]}, size, skip_bad, source=folder)

    @property
    def prompts(self) -> list[str] | None:
        """Prompts that have references; None in folder mode (meaning: every prompt)."""
        return None if self.folder_mode else list(self._index)

    def __len__(self) -> int:
        return len(self.images)

    def fewest(self) -> int:
        """The smallest number of images any prompt has (folder mode: the folder's)."""
        return min(map(len, self._index.values()))

    def missing(self, prompts: list[str]) -> list[str]:
        """The given prompts that have no reference image (deduplicated, in order); [] in folder mode."""
        return [] if self.folder_mode else [p for p in dict.fromkeys(prompts) if p not in self._index]

    def _rows(self, prompt: str) -> list[int]:
        if self.folder_mode:
            return self._index[None]
        if prompt not in self._index:
            raise KeyError(f"no reference images for prompt {prompt!r} "
                           "(ReferenceSet.missing() lists such prompts)")
        return self._index[prompt]

    def sample(self, prompts: list[str], n_per_prompt: int, generator: torch.Generator) -> torch.Tensor:
        """n_per_prompt references per prompt, prompt by prompt, float in [0, 1], on the CPU.
        Without replacement unless a prompt has fewer than n_per_prompt images; only `generator` is used."""
        picked = []
        for prompt in prompts:
            rows = self._rows(prompt)
            if len(rows) >= n_per_prompt:
                draw = torch.randperm(len(rows), generator=generator, device=generator.device)[:n_per_prompt]
            else:
                draw = torch.randint(len(rows), (n_per_prompt,), generator=generator, device=generator.device)
            picked += [rows[i] for i in draw.tolist()]
        return self.images[picked].float() / 255  # (len(prompts) * n_per_prompt, 3, H, W)

    def images_of(self, prompt: str) -> torch.Tensor:
        """All references of one prompt (the whole folder in folder mode), float in [0, 1]: (k, 3, H, W)."""
        return self.images[self._rows(prompt)].float() / 255


def load_references(cfg, prompts):
    """The run's "real" images (cfg.references: an index or a folder), validated at start-up: every
    training prompt in `prompts` [{"prompt": ...}] must have references."""
    if os.path.isdir(cfg.references):
        refs = ReferenceSet.from_folder(cfg.references, size=cfg.resolution, skip_bad=cfg.skip_bad_references)
    else:
        refs = ReferenceSet.from_index(cfg.references, cfg.reference_root or None, size=cfg.resolution,
                                       skip_bad=cfg.skip_bad_references)
    if cfg.d_conditional and refs.folder_mode:
        raise SystemExit("config error: d_conditional needs references per prompt (an index): in a folder "
                         "every image is real for every prompt, so there is no 'wrong prompt'")
    missing = refs.missing([p["prompt"] for p in prompts])
    if missing:
        raise SystemExit(f"{len(missing)} of {len(prompts)} training prompts have no reference images in "
                         f"{cfg.references}, e.g. {missing[:3]}. Add references or remove these prompts.")
    return refs


if __name__ == "__main__":  # an earlier README's command: say where it went (exit 1 unless asked for help)
    import sys
    print("making and importing data is prepare.py now: "
          "python prepare.py {make_references|import_prompts|import_references} (--help)")
    sys.exit(0 if sys.argv[1:2] in (["-h"], ["--help"]) else 1)
