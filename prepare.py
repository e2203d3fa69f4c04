"""
prepare.py — the data a run trains on, made or imported once, offline, before training.

    python prepare.py import_prompts --src flow_grpo/dataset/pickscore/train.txt --out data/train.txt
    python prepare.py make_references --model Qwen/Qwen-Image --prompts data/train.txt --out data/refs --n 8
    python prepare.py import_references --index qwen_images/prompt2img_node*.json --images qwen_images \\
        --out data/refs/index.json
    python prepare.py make_references --help                   # every key of a command

Owns
- `make_references`: n images per prompt from any diffusers text-to-image pipeline (the paper: Qwen-Image,
  512², 50 steps, 8 per prompt), written as PNGs and the published index {prompt: [relative paths]}.
- `import_prompts` / `import_references`: the published prompt sets and reference indexes rewritten in the
  formats data.py reads (strict prompts; one merged index).

Leaves out: reading and checking them at start-up (data.py).

Departs from the published code: CFG is asked for in each pipeline's own way (`guidance_kwargs`); the
published generation script writes one index per node, merged here.
"""
import dataclasses
import inspect
import json
import os
import sys

import configurator  # stdlib only: --help answers before torch loads


@dataclasses.dataclass
class MakeReferences:
    model: str = ""                   # hub id or folder of a diffusers text-to-image pipeline
    prompts: str = ""                 # prompt file (.txt or .jsonl)
    out: str = "data/refs"            # output folder (PNGs + index.json)
    n: int = 8                        # images per prompt (the paper: 8)
    steps: int = 50                   # sampling steps (the paper: 50 with Qwen-Image)
    guidance_scale: float = 4.0       # CFG, asked for in the pipeline's own way
    size: int | None = None           # default: the pipeline's sample_settings.json, else 512
    seed: int = 0                     # image j of prompt k is seeded by seed·1,000,003 + k·n + j


@dataclasses.dataclass
class ImportPrompts:
    src: str = ""                     # a downloaded .txt or .jsonl prompt file
    out: str = "data/train.txt"       # .txt (prompts only) or .jsonl (metadata kept)


@dataclasses.dataclass
class ImportReferences:
    index: list = dataclasses.field(default_factory=list)  # published {prompt: [names]} JSON files
    images: str = ""                  # the folder holding the images those names refer to
    out: str = "data/refs/index.json"  # the merged index (train.py's default `references`)


COMMANDS = {"make_references": MakeReferences, "import_prompts": ImportPrompts,
            "import_references": ImportReferences}


def command(argv):
    """(the command's settings) from argv = [command, --key=value ...]; --help answers and exits."""
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.split("\n\n")[1])
        raise SystemExit(0)
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: python prepare.py {{{'|'.join(COMMANDS)}}} --key=value ...  "
                         "(--help per command)")
    return configurator.parse(argv[1:], COMMANDS[argv[0]], usage=f"python prepare.py {argv[0]}\n")[0]


if __name__ == "__main__" and any(a in ("-h", "--help") for a in sys.argv[1:]):
    command(sys.argv[1:])

import torch
from diffusers import DiffusionPipeline
from tqdm.auto import tqdm

import archs
import data
import scorers

# -----------------------------------------------------------------------------------------------
# Making references: `python prepare.py make_references --model M --prompts F --out DIR`
# The paper's references come from a stronger model (Qwen-Image, 512², 50 steps, 8 per prompt);
# any diffusers text-to-image pipeline works. Writes DIR/<k>_<j>.png and DIR/index.json.

def guidance_kwargs(pipe, guidance_scale, m):
    """The pipeline's own way of asking for classifier-free guidance of strength `guidance_scale`, for m
    prompts. Most pipelines take `guidance_scale`. Qwen-Image (the paper's reference model) and other
    pipelines with `true_cfg_scale` run real CFG only when given that *and* a negative prompt; their
    `guidance_scale` is for guidance-distilled transformers and is otherwise ignored with a warning, which
    would silently give references without CFG."""
    params = inspect.signature(pipe.__call__).parameters
    transformer_cfg = getattr(getattr(pipe, "transformer", None), "config", None) or {}
    distilled = bool(transformer_cfg.get("guidance_embeds", False))  # e.g. FLUX.1-dev: guidance is an input
    if "true_cfg_scale" in params and not distilled:
        return dict(true_cfg_scale=guidance_scale, negative_prompt=[" "] * m)  # " ": diffusers' own advice
    return dict(guidance_scale=guidance_scale)


def make_references(model, prompts_file, out, n=8, steps=50, guidance_scale=4.0, size=None, seed=0,
                    batch_size=4, device=None):
    """n images per prompt from any diffusers pipeline. `size` defaults to the folder's sample_settings.json
    resolution (pipelines this project writes), else 512; its text length is honoured the same way."""
    settings = archs.pipeline_settings(model)
    size = size or settings.get("resolution", 512)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    # a local folder saved without some component (e.g. SD3 without T5) lists it as [null, null]
    index_file = os.path.join(model, "model_index.json")
    absent = {k: None for k, v in json.load(open(index_file)).items()
              if isinstance(v, list) and v[0] is None} if os.path.exists(index_file) else {}
    pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype, **absent).to(device)
    pipe.set_progress_bar_config(disable=True)
    extra = guidance_kwargs(pipe, guidance_scale, 1)
    if ("max_sequence_length" in settings
            and "max_sequence_length" in inspect.signature(pipe.__call__).parameters):
        extra["max_sequence_length"] = settings["max_sequence_length"]
    prompts = [p["prompt"] for p in data.load_prompts(prompts_file)]
    os.makedirs(out, exist_ok=True)
    index = {}
    for k, prompt in enumerate(tqdm(prompts, desc="references")):
        index[prompt] = []
        for j0 in range(0, n, batch_size):
            m = min(batch_size, n - j0)
            gen = [torch.Generator(device).manual_seed(seed * 1_000_003 + k * n + j0 + i) for i in range(m)]
            images = pipe([prompt] * m, num_inference_steps=steps, height=size, width=size, generator=gen,
                          **{**extra, **guidance_kwargs(pipe, guidance_scale, m)}).images
            for i, im in enumerate(images):
                name = f"{k:05d}_{j0 + i}.png"
                im.save(os.path.join(out, name))
                index[prompt].append(name)
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump(index, f, indent=1)
    return os.path.join(out, "index.json")


# -----------------------------------------------------------------------------------------------
# Importing the published prompt sets and reference indexes
# Prompts: Flow-GRPO's dataset/ folder (github.com/yifan123/flow_grpo) holds the paper's sets —
# pickscore/{train,test}.txt (the DINO and PickScore experiments), geneval/{train,test}_metadata.jsonl,
# ocr/{train,test}.txt. References: the published generation script writes prompt2img_node<N>.json
# ({prompt: [file names]}) per node beside the images.

MAX_BYTES = 1 << 28  # a prompt file or index larger than 256 MB is not one (e.g. a link to /dev/zero)


def read_text(path):
    with open(path, encoding="utf-8-sig") as f:
        text = f.read(MAX_BYTES + 1)
    if len(text) > MAX_BYTES:
        raise ValueError(f"{path}: larger than {MAX_BYTES >> 20} MB, not a prompt file or index")
    return text


def replace_file(out, write, check=lambda path: None):
    """Write `out` through a temporary file beside it, check that file, then rename: a failure leaves the
    user's earlier `out` as it was (and no temporary file)."""
    folder, name = os.path.split(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp.{name}")  # the same extension: the check reads it as `out`
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            write(f)
        check(tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def import_prompts(src, out):
    """A downloaded prompt file (.txt, or .jsonl with "prompt") rewritten in our strict format: stripped,
    blank lines dropped (we refuse them), metadata kept (.jsonl). Returns (kept, dropped)."""
    ext = os.path.splitext(src)[1].lower()
    raw = [line.strip() for line in read_text(src).removesuffix("\n").split("\n")]
    rows = [json.loads(line) if ext == ".jsonl" else {"prompt": line} for line in raw if line]
    rows = [r for r in rows if isinstance(r, dict) and isinstance(r.get("prompt"), str)
            and r["prompt"].strip()]
    if not rows:
        raise ValueError(f"{src}: no prompts (a .jsonl needs a \"prompt\" string on each line)")
    replace_file(out, lambda f: f.writelines(
        (json.dumps({**r, "prompt": r["prompt"].strip()}, ensure_ascii=False) if out.endswith(".jsonl")
         else r["prompt"].strip().replace("\n", " ")) + "\n" for r in rows),
        check=data.load_prompts)  # what we wrote must read back
    return len(rows), len(raw) - len(rows)


def import_references(indexes, images, out):
    """Merge published {prompt: [file names]} indexes (e.g. prompt2img_node*.json) whose files lie in
    `images` into one index at `out`, paths relative to out's folder. Returns (prompts, files, missing)."""
    if not indexes:
        raise ValueError("no --index given: name the published {prompt: [file names]} JSON files")
    merged = {}
    for path in indexes:
        index = json.loads(read_text(path))
        if not isinstance(index, dict):
            raise ValueError(f"{path}: not a {{prompt: [file names]}} index")
        for prompt, names in index.items():
            names = names if isinstance(names, list) else [names]
            if not all(isinstance(n, str) for n in [prompt, *names]):
                raise ValueError(f"{path}: {prompt!r}: prompts and file names must be strings")
            merged.setdefault(prompt, []).extend(n for n in names if n not in merged.get(prompt, []))
    root = os.path.dirname(os.path.abspath(out))
    index = {p: [os.path.relpath(os.path.join(os.path.abspath(images), n), root) for n in names]
             for p, names in merged.items()}
    os.makedirs(root, exist_ok=True)  # before the check: "<root>/../x" resolves only through an existing root
    missing = [f for names in index.values() for f in names if not os.path.isfile(os.path.join(root, f))]
    replace_file(out, lambda f: json.dump(index, f, indent=1, ensure_ascii=False))
    return len(index), sum(map(len, index.values())), missing


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    a = command(argv)
    if argv[0] == "make_references":
        if not (a.model and a.prompts):
            raise SystemExit("make_references needs --model and --prompts")
        if a.model.startswith((".", "/", "~")) and not os.path.isdir(a.model):
            raise SystemExit(f"make_references: no model folder {a.model}")
        try:  # a bad size, prompt file or model: one line, not the library's traceback
            data.load_prompts(a.prompts)  # before the (slow) model load
            print(make_references(a.model, a.prompts, a.out, a.n, a.steps, a.guidance_scale, a.size, a.seed))
        except (OSError, ValueError) as e:
            raise SystemExit(f"make_references: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    elif argv[0] == "import_prompts":
        try:
            kept, dropped = import_prompts(a.src, a.out)
        except (OSError, ValueError) as e:
            raise SystemExit(f"import_prompts: {e}") from None
        quoting = sum(scorers.quoted(p["prompt"]) is not None for p in data.load_prompts(a.out))
        print(f"{a.out}: {kept} prompts ({dropped} blank lines dropped)"
              + (f"; {quoting} quote a text (the ocr reward's target)" if quoting else ""))
    else:
        try:
            n_prompts, n_files, missing = import_references(a.index, a.images, a.out)
        except (OSError, ValueError) as e:
            raise SystemExit(f"import_references: {e}") from None
        print(f"{a.out}: {n_prompts} prompts, {n_files} images"
              + (f"; {len(missing)} missing, e.g. {missing[0]}" if missing else ""))


if __name__ == "__main__":
    main()
