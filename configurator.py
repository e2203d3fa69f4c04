"""
configurator.py — every knob of a run with its default, and the one parser that sets them.

    python train.py config/tiny.py --lr=1e-4 --seed=1      # presets (Python files) in order, then --key=value
    python train.py --help                                 # every key, its default and what it means

`Config`'s defaults are the paper's main setting: SD3.5-Medium, 512², the adversarial DINOv2 reward, the
published hyper-parameters. A preset in config/ is a Python file assigning some of these names (`lr = 1e-4`;
YAML's `lr: 1e-4` is an annotation to Python and refused) that states what differs from its base: the
defaults, or the preset named by `base = "tiny.py"` (relative to its folder), applied first. `parse` serves
train.py, sample.py, prepare.py and bench.py: each passes its dataclasses, and a key goes to the one that has
it. Unknown keys, wrong types and impossible values are refused in one line naming the key and where it came
from, before any model loads.
"""

import ast
import difflib
import inspect
import io
import math
import os
import tokenize
import typing
from dataclasses import dataclass, field

import archs

@dataclass
class Config:
    # model
    pretrained: str = "stabilityai/stable-diffusion-3.5-medium"  # hub id, local folder, or random:<arch>
    t5: bool = True                   # load T5-XXL; False feeds zeros in its place (as diffusers allows)
    max_sequence_length: int | None = None  # T5 tokens; None: sample_settings.json's, else 128 (the recipe's)
    resolution: int = 512            # image side in pixels (square)
    lora_rank: int = 32               # 0 = full fine-tuning
    lora_alpha: int = 64              # LoRA scale alpha / rank (the recipe: 64 / 32 = 2)
    lora_targets: list = field(default_factory=list)  # modules the LoRA adapts (peft name suffixes); [] = the
                                      # recipe's joint attention (model.LORA_TARGETS); init_lora: its own
    init_lora: str = ""               # start from a LoRA folder, diffusers' (our lora/) or PEFT's (Adv-GRPO's
                                      # releases, Flow-GRPO's lora_path); its rank, alpha, targets are taken
    gradient_checkpointing: bool = False  # recompute activations in the backward pass (memory for time)
    compile: bool = False             # torch.compile the transformer
    low_mem: bool = False             # 24 GB GPUs: prompts encoded once, text encoders freed (embeddings kept
                                      # on the CPU), VAE decodes 4 at a time (preset: config/sd35m_24gb.py)
    mixed_precision: str = "bf16"     # "bf16" (frozen weights bf16, autocast; CPU too) or "no" (float32)
    # data
    train_prompts: str = "data/train.txt"       # .txt (one per line) or .jsonl with "prompt"
    test_prompts: str = "data/test.txt"         # held-out prompts of the in-loop evaluation
    # sampling
    num_steps: int = 10               # N sampling steps of a rollout
    guidance_scale: float = 4.5       # CFG of GRPO's samples and log-probs; 1 = off (nft: nft_guidance_scale)
    sde_kind: str = "cps"             # "cps" (Adv-GRPO) or "sde" (Flow-GRPO)
    noise_level: float | None = None  # a; None: by sde_kind (cps 0.8 as Adv-GRPO, sde 0.7 as Flow-GRPO)
    window_start: str = "0"           # first trained step: an integer (published: 0), or "random": drawn per
                                      # epoch from 0..N/2 inclusive (the paper's text; the published range)
    window_size: int = 2              # K trained (stochastic) steps; the rest are ODE
    # batch arithmetic (global = across all ranks)
    group_size: int = 16              # images per prompt
    prompts_per_epoch: int = 48       # prompts per epoch (48 × 16 = 768 images: 96 per GPU on 8)
    sample_batch_size: int = 16       # images per sampling forward on one rank
    train_batch_size: int = 8         # images per training forward on one rank
    updates_per_epoch: int = 2        # optimizer steps per epoch; gradients accumulate in between
    # GRPO
    lr: float = 3e-4                  # AdamW learning rate of the generator
    lr_half_life: int = 0             # beyond the paper: lr halves every N optimizer steps (0: constant)
    weight_decay: float = 1e-4        # AdamW weight decay
    max_grad_norm: float = 1.0        # gradient clipping (global norm)
    clip_range: float | None = None   # ε of the ratio clip; None: by sde_kind (cps 1e-5: its log-prob is
                                      # unscaled; sde 1e-4)
    adv_clip: float = 5.0             # advantages clipped to ±adv_clip
    beta_kl: float = 0.0              # KL to the frozen base, β·mean((μ_θ - μ_ref)²)
    global_std: bool = True           # normalise advantages by the std of all rewards of the epoch
    adv_std: bool = True              # divide advantages by that std; False: r - mean of its group (the
                                      # reward's own scale: small steps where the head is unsure)
    adv_gap: bool = False             # beyond the paper: advantages × erf(d/2) in [0, 1], d the D's gap
                                      # between references and generations (train.gap): alike, no steps
    adv_signal: bool = False          # beyond the paper: advantages × d_signal in [0, 1], the split-half
                                      # pair's agreement: no full steps on an adversarial reward turned noise
    g_beta1: float = 0.9              # the generator's AdamW β1 (momentum; Flow-GRPO's 0.9); β2 is 0.999
    ema_decay: float = 0.9            # the EMA's decay after its warm-up: min((1 + s)/(10 + s), ema_decay)
    ema_every: int = 8                # EMA update every N optimizer steps
    # the generator's objective: the paper's GRPO, or DiffusionNFT (nft.py: its maths, defaults, departures)
    objective: str = "grpo"           # "grpo" (the paper: clipped ratio of the SDE window's log-probs) or
                                      # "nft" (DiffusionNFT: flow matching on an old model's ODE samples)
    nft_beta: float = 1.0             # nft: β of v± = v_old ± β·(v_θ - v_old) (published 1; 0.1 for OCR)
    nft_eta_max: float = 0.5          # nft: after each G update θ_old ← η·θ_old + (1-η)·θ, with η = min(
                                      # nft_eta_rate · optimizer steps so far, nft_eta_max); in [0, 1)
    nft_eta_rate: float = 0.001       # nft: η's growth per optimizer step (published: 0.5 after 500 steps)
    nft_t_fraction: float = 0.99      # nft: each image trains on int(fraction · num_steps) of the sampler's
                                      # times, drawn without repetition, each with fresh noise
    nft_guidance_scale: float = 1.0   # nft: CFG of its samples (published 1; guided ones teach the guidance
                                      # to the conditional velocity, and a guided evaluation guides twice)
    nft_adaptive: bool = True         # nft: each branch's x0 error divided by its own mean |error|
                                      # (published); False: the paper's r·‖v⁺ - v‖² + (1-r)·‖v⁻ - v‖²
    # reward: a weighted sum; "dino_adv" / "pickscore_adv" are learned adversarially, others fixed
    reward: dict = field(default_factory=lambda: {"dino_adv": 1.0})  # {name: weight or {'weight': w, setting:
                                      # value}} (settings: reward.py), e.g. "{'dino_adv': 1.0, 'ocr_sim':
                                      # {'weight': 1.0, 'lam': 0.3}}"
    references: str = "data/refs/index.json"  # {prompt: [relative paths]} index, or a folder (real for all)
    reference_root: str = ""          # root of the index's paths (default: the JSON's folder)
    skip_bad_references: bool = False  # drop unreadable reference images with a warning instead of stopping
    schedule: str = "paper"           # "paper": D-only epochs, G every d_times-th; "shared": G + D on one
                                      # batch; "frozen": D trains only during d_warmup, then stays fixed
    d_warmup: int = 0                 # first epochs in which only the discriminator trains
    d_times: int = 10                 # paper schedule: G trains on epochs where (epoch+1) % d_times == 0
    d_steps: int = 1                  # D steps per D epoch, on the same samples
    d_lr: float = 1e-4                # Adam (0.5, 0.999) learning rate of the DINO discriminator head
    d_steps_max: int = 0              # beyond the paper, > 0: D's steps by its accuracy on the new
                                      # generations: this many below 0.6, none above 0.8, else d_steps
    d_r1: float = 0.0                 # beyond the paper: γ of an R1 penalty γ/2·|∇h|² at the reference tokens
                                      # (a head flat at the references: no reward for running past them)
    d_replay: int = 0                 # beyond the paper: the last N epochs' generations stay as extra fakes,
                                      # one per image (GAN practice against drifting back to old flaws)
    d_hidden: int = 512               # width of the DINO head h = Linear(D, width) → GELU → Linear(width, 1)
    d_patches: int = 64               # patch tokens drawn per image for the DINO head (all when fewer)
    d_patch_loss: float = 0.3         # λ_p: weight of the patch tokens' hinge loss beside the CLS token's
    d_cls_weight: float = 0.7         # DINO reward r = w·h(CLS) + (1 - w)·mean h(patch tokens); in [0, 1]
    d_conditional: bool = False       # beyond the paper: the D head also sees the prompt (projection term on
                                      # the pooled text embedding); references of other prompts count as fakes
    dino_backbone: str = "vit_base_patch14_dinov2.lvd142m"  # timm name, or "random:tiny" (tests)
    dino_weights: str = ""            # local weights file for the backbone (clusters without hub access)
    dino_kwargs: dict = field(default_factory=dict)  # timm.create_model architecture kwargs (tiny world)
    dino_image_size: int = 518        # images are resized to this for the backbone (DINOv2: 518 = 37 × 14)
    pickscore_model: str = "yuvalkirstain/PickScore_v1"     # hub id, folder, or random:tiny / random:vit-h-14
    pickscore_processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # its tokenizer (hub id or folder)
    pickscore_train_last_k: int = 1   # vision layers the PickScore adversary trains (paper 2, code 1)
    pickscore_lr: float = 5e-6        # Adam (0.5, 0.999) learning rate of the PickScore adversary
    clip_model: str = "openai/clip-vit-large-patch14"  # CLIP of clip_score, clip_sim, aesthetic
    aesthetic_weights: str = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                              "sac+logos+ava1-l14-linearMSE.pth")  # aesthetic's MLP: URL, file, "random"
    # run
    epochs: int = 1000                # sampling rounds (each: D and/or G work, per the schedule)
    seed: int = 0                     # every random stream derives from (seed, epoch, image), not the rank
    out_dir: str = "out/sd35m_dino"   # metrics, samples, checkpoints (one run per folder)
    save_every: int = 20              # epochs between checkpoints
    keep_last: int = 3                # checkpoints kept on disk
    resume: bool = False              # continue from the newest intact checkpoint in out_dir
    overwrite: bool = False           # clear a used out_dir first (only the files a run writes there)
    allow_config_change: bool = False  # --resume may change keys that define the experiment (seed, model, …)
    max_bad_updates: int = 5          # stop after this many consecutive non-finite updates
    log_to: str = ""                  # also log to "wandb" or "tensorboard" (installed separately)
    # held-out evaluation (EMA weights, ODE, fixed seeds) every eval_every epochs and at the end
    eval_every: int = 20              # 0 = never
    eval_num_steps: int = 40          # ODE steps of the held-out samples
    eval_guidance_scale: float = 4.5  # CFG of the held-out samples
    eval_n_per_prompt: int = 1        # images per test prompt
    eval_max_prompts: int = 64        # first N test prompts (0 = all)


# What None means for the keys whose default depends on another one (filled in by resolve_defaults)
SDE_DEFAULTS = {"cps": dict(noise_level=0.8, clip_range=1e-5), "sde": dict(noise_level=0.7, clip_range=1e-4)}
def resolve_defaults(cfg):
    """Fill in the keys left None: noise_level / clip_range by sde_kind, max_sequence_length from the
    pipeline folder's sample_settings.json (else 128). A value that contradicts the pipeline's settings
    is refused: it would sample garbage without an error."""
    pipeline = archs.pipeline_settings(cfg.pretrained)
    for key, value in {**SDE_DEFAULTS.get(cfg.sde_kind, {}), "max_sequence_length": 128, **pipeline}.items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
        elif key in pipeline and getattr(cfg, key) != value:
            raise SystemExit(f"config error: {cfg.pretrained} was trained with {key} = {value} "
                             f"({archs.SETTINGS_FILE}); {key} = {getattr(cfg, key)} would sample garbage")
    return cfg


# What every key may be, checked before anything else (the batch arithmetic below divides by some): rows of
# (keys, ok(value, cfg), what a value must be: "{c.key}" reads the config), in order. A number must also be
# finite, and None (a default not yet resolved) fails every row.
AT_LEAST_1 = ("num_steps", "prompts_per_epoch", "sample_batch_size", "train_batch_size", "updates_per_epoch",
              "epochs", "save_every", "keep_last", "ema_every", "d_times", "d_steps", "max_bad_updates",
              "eval_num_steps", "eval_n_per_prompt", "dino_image_size", "resolution", "max_sequence_length",
              "lora_alpha", "d_hidden", "d_patches")
POSITIVE = ("lr", "d_lr", "pickscore_lr", "max_grad_norm", "clip_range", "adv_clip", "nft_beta")
NON_NEGATIVE = ("lora_rank", "weight_decay", "beta_kl", "d_warmup", "d_steps_max", "d_replay", "d_r1",
                "lr_half_life", "eval_every", "eval_max_prompts", "pickscore_train_last_k", "nft_eta_rate",
                "d_patch_loss")
UNIT_INTERVAL = ("noise_level", "ema_decay", "nft_t_fraction", "d_cls_weight", "g_beta1")
# Beyond these a value is a typo, not a setting (gigabytes allocated before anything fails, a loss of inf)
AT_MOST = dict(lora_rank=1024, lora_alpha=1e4, d_hidden=1 << 16, d_patches=4096, nft_beta=1e3)
RULES = [
    ("mixed_precision", lambda v, c: v in ("bf16", "no"), "'bf16' or 'no'"),
    ("schedule", lambda v, c: v in ("paper", "shared", "frozen"), "'paper', 'shared' or 'frozen'"),
    ("objective", lambda v, c: v in ("grpo", "nft"), "'grpo' or 'nft'"),
    ("sde_kind", lambda v, c: v in SDE_DEFAULTS,
     "'cps' or 'sde' (\"ode\" has no noise, hence no log-probability to train on)"),
    ("group_size", lambda v, c: v >= 2, "≥ 2: GRPO compares the images of one prompt"),
    (AT_LEAST_1, lambda v, c: v >= 1, "≥ 1"), (POSITIVE, lambda v, c: v > 0, "> 0"),
    (NON_NEGATIVE, lambda v, c: v >= 0, "≥ 0"), (UNIT_INTERVAL, lambda v, c: 0 <= v <= 1, "in [0, 1]"),
    *((k, lambda v, c, m=m: v <= m, f"≤ {m:g}") for k, m in AT_MOST.items()),
    ("nft_eta_max", lambda v, c: 0 <= v < 1, "in [0, 1) (η = 1 would freeze the old model for good)"),
    ("nft_t_fraction", lambda v, c: v > 0, "in (0, 1]: 0 trains on no time at all"),
    ("ema_decay", lambda v, c: v < 1, "< 1: at 1 the EMA weights (evaluated, exported) never leave the base"),
    (("guidance_scale", "eval_guidance_scale", "nft_guidance_scale"), lambda v, c: 1 <= v <= 100,
     "in [1, 100] (1 = no CFG; far above the usual 3-7 the guided velocity is no longer finite)"),
    (("lr", "d_lr", "pickscore_lr"), lambda v, c: v <= 1, "≤ 1 (Adam moves every weight by about lr a step)"),
    ("clip_range", lambda v, c: v < 1, "< 1 (ε: the ratio is clipped to [1 - ε, 1 + ε])"),
    ("weight_decay", lambda v, c: v <= 1, "≤ 1 (AdamW shrinks weights by lr·weight_decay a step)"),
    ("seed", lambda v, c: 0 <= v < 2 ** 63, "in 0 .. 2**63 - 1"),
    ("out_dir", lambda v, c: not os.path.isfile(v), "a folder (it is a file)"),
    ("sde_kind", lambda v, c: v == "cps" or c.objective == "grpo",
     "left at 'cps' with objective = 'nft' (it is GRPO's stochastic step; nft samples with the ODE)"),
    ("window_start", lambda v, c: v == "0" or c.objective == "grpo",
     "left at '0' with objective = 'nft' (it is GRPO's SDE window; nft samples the whole ODE)"),
    ("window_start", lambda v, c: v == "random" or v.isdigit(), "an integer or 'random'"),
    ("window_size", lambda v, c: 1 <= v <= c.num_steps, "in 1..num_steps ({c.num_steps})"),
    ("window_start", lambda v, c: not v.isdigit() or int(v) + c.window_size <= c.num_steps,
     "such that the window [window_start, window_start + {c.window_size}) fits in num_steps = {c.num_steps}"),
    ("beta_kl", lambda v, c: v == 0 or c.lora_rank > 0, "0 without LoRA (the KL's base is the adapter off)"),
]


def check(cfg):
    """One line naming the first key whose value breaks a rule above or archs.check; None if all are fine."""
    for keys, ok, want in RULES:
        for key in (keys,) if isinstance(keys, str) else keys:
            v = getattr(cfg, key)
            finite = not isinstance(v, float) or math.isfinite(v)
            if v is None or not (finite and ok(v, cfg)):
                return f"{key} must be {want.format(c=cfg) if finite else 'a finite number'}, got {v!r}"
    return archs.check(cfg)


def timesteps_per_image(cfg):
    """objective = "nft": how many of the N grid times each image is trained on, int(nft_t_fraction·N) ≥ 1."""
    return max(1, int(cfg.nft_t_fraction * cfg.num_steps))


def split_error(cfg, world):
    """Why the epoch's images cannot be split over `world` ranks into sample and train batches and
    updates_per_epoch optimizer steps, or None."""
    n, nft = cfg.prompts_per_epoch * cfg.group_size, cfg.objective == "nft"
    per_rank, per_image = n // world, timesteps_per_image(cfg) if nft else cfg.window_size  # passes an image
    if n % world:
        m, p = world // math.gcd(cfg.group_size, world), cfg.prompts_per_epoch  # p must be a multiple of m
        return (f"prompts_per_epoch × group_size = {n} images must split evenly over {world} ranks "
                f"(prompts_per_epoch = {_nearest(lambda q: q % m == 0, p, p + m)} would do)")
    for key in ("sample_batch_size", "train_batch_size"):
        if per_rank % (b := getattr(cfg, key)):
            return (f"images per rank ({per_rank}) must be a multiple of {key} ({b}; "
                    f"{_nearest(lambda d: per_rank % d == 0, b, per_rank)} would do)")
    if (batches := per_rank // cfg.train_batch_size) * per_image % cfg.updates_per_epoch:
        return (f"backward passes per epoch ({batches} batches × {per_image} {'times' if nft else 'steps'}) "
                f"must be a multiple of updates_per_epoch ({cfg.updates_per_epoch})")
    return None


def _nearest(ok, b, top):
    """The values in 1..top that pass ok closest to b, from below and from above: what a key could be."""
    below = next((v for v in range(min(b, top), 0, -1) if ok(v)), None)  # each search stops at its first
    above = next((v for v in range(b, top + 1) if ok(v)), None)
    return " or ".join(map(str, dict.fromkeys(v for v in (below, above) if v)))


def step_chunks(cfg):
    """Into how many chunks of micro-batches an epoch's optimizer steps split its images (updates_per_epoch /
    it split each image's trained steps): the largest divisor of updates_per_epoch dividing the micro-batches
    per rank under *every* legal world size: a step holds the same images on any (train.training_passes)."""
    n_global, m = cfg.prompts_per_epoch * cfg.group_size, 0
    for world in range(1, n_global + 1):
        if split_error(cfg, world) is None:
            m = math.gcd(m, n_global // world // cfg.train_batch_size)
    return math.gcd(cfg.updates_per_epoch, m)


def validate(cfg, world, warn=None):
    """The rules above and the batch arithmetic for `world` ranks, refused in one line before anything loads;
    what is legal but surely not meant is said through `warn` (e.g. print). Rewards': reward.check_config."""
    if bad := check(cfg) or split_error(cfg, world):
        raise SystemExit(f"config error: {bad}")
    if warn and cfg.noise_level == 0 and cfg.objective == "grpo":
        warn("WARNING noise_level = 0: the training window is deterministic, every log-prob ratio is 1 and "
             "nothing is explored or learnt (the recipe: 0.8 for cps, 0.7 for sde)", flush=True)


# -----------------------------------------------------------------------------------------------
# The parser

def comments(cls):
    """{field: its comment} and the section comments, in order, read from the dataclass's source: what
    --help prints. A comment continued on the following comment-only lines is joined."""
    out, current = {}, None
    for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline):
        text, indent = tok.string.lstrip("#").strip(), tok.start[1]
        if tok.type == tokenize.NAME and indent == 4 and tok.line.strip().split(":")[0] == tok.string:
            current, out[text] = text, ""                  # a key
        elif tok.type == tokenize.COMMENT and indent == 4:  # a section header (keys' comments: further right)
            current, out[f"# {text}"] = None, None
        elif tok.type == tokenize.COMMENT and current is not None:
            out[current] = f"{out[current]} {text}".strip()
    return out


def help_text(*schemas):
    """--help: each schema's sections, then its keys with their defaults and comments."""
    return "\n".join(f"\n  {key[2:]}" if text is None else f"    --{key}={getattr(cls(), key)!r}".ljust(44)
                     + f" {text}" for cls in schemas for key, text in comments(cls).items())


def _coerce(hint, key, value, where):
    kinds = typing.get_args(hint) or (hint,)                     # `float | None` -> (float, NoneType)
    if value is None and type(None) in kinds:
        return None
    want = kinds[0]
    if want is str or want is float and type(value) is int:  # --window_start=0 parses as an int, --lr=1 too
        value = want(value)
    if type(value) is not want:
        raise SystemExit(f"{where}: {key} must be {want.__name__}, got {value!r} ({type(value).__name__}); "
                         f"write --{key}=<value>")
    return value


def parse(argv, *schemas, usage=""):
    """Instances of `schemas` (dataclasses) set from presets (*.py, executed in order) and --key=value /
    --key value arguments; --help prints every key. Returns one instance per schema."""
    if any(a in ("-h", "--help") for a in argv):
        print(usage + help_text(*schemas))
        raise SystemExit(0)
    objs = [cls() for cls in schemas]
    hints = {k: (o, h) for o in reversed(objs) for k, h in typing.get_type_hints(type(o)).items()}  # 1st wins

    def set_key(key, value, where):
        if key not in hints:
            close = difflib.get_close_matches(key, hints, n=1)
            raise SystemExit(f"{where}: unknown config key {key!r}"
                             + (f" (did you mean {close[0]!r}?)" if close else ""))
        obj, hint = hints[key]
        setattr(obj, key, _coerce(hint, key, value, where))

    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg.endswith(".py") and not arg.startswith("--"):
            for key, (value, where) in run_preset(arg).items():
                set_key(key, value, where)
        elif arg.startswith("--"):
            key, eq, raw = arg[2:].partition("=")
            kinds = typing.get_args(hints[key][1]) or (hints[key][1],) if key in hints else ()
            if not eq and list in kinds:  # --key v1 v2 ...: every value up to the next --key
                values = []
                while args and not args[0].startswith("--"):
                    values.append(literal(args.pop(0)))
                set_key(key, getattr(hints[key][0], key) + values, "command line")
                continue
            if not eq:  # a bare --flag is True; "--key value" is "--key=value" (for a flag: True or False)
                takes = args and not args[0].startswith("--") and (bool not in kinds
                                                                   or args[0] in ("True", "False"))
                raw = args.pop(0) if takes else "True"
            set_key(key, literal(raw), "command line")
        else:
            raise SystemExit(f"unexpected argument {arg!r}: give preset files (*.py) and --key=value")
    return objs


def literal(raw):
    """A command-line value as Python reads it (1e-4, True, {'a': 1}), else as the plain string."""
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def run_preset(path, _seen=()):
    """A preset's assignments {name: (value, file that set it)}, its `base` preset's first. It runs as Python;
    a bare annotation (YAML's `lr: 0.1`) would silently do nothing, so it is refused with its line."""
    if os.path.abspath(path) in _seen:
        raise SystemExit(f"{path}: presets inherit from each other in a circle ({' → '.join(_seen)})")
    try:
        source = open(path).read()
    except FileNotFoundError:
        raise SystemExit(f"preset file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:  # a folder, unreadable, not text
        raise SystemExit(f"preset {path} cannot be read as a Python file: "
                         f"{getattr(e, 'strerror', None) or e}") from None
    try:
        tree = ast.parse(source, path)
    except SyntaxError as e:
        raise SystemExit(f"{path}:{e.lineno}: syntax error in preset: {e.msg}") from None
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and node.value is None:
            raise SystemExit(f"{path}:{node.lineno}: '{ast.unparse(node)}' is an annotation, not an "
                             f"assignment (presets are Python: write {ast.unparse(node.target)} = ...)")
    ns = {}
    try:
        exec(compile(tree, path, "exec"), ns)
    except Exception as e:  # (a SystemExit it raises is no Exception: it passes)
        raise SystemExit(f"{path}: the preset raised {type(e).__name__}: {e}") from None
    values = {k: (v, path) for k, v in ns.items()
              if not k.startswith("_") and not callable(v) and not inspect.ismodule(v)}
    base, seen = values.pop("base", (None,))[0], (*_seen, os.path.abspath(path))
    if base is not None and not (isinstance(base, str) and base.endswith(".py")):
        raise SystemExit(f"{path}: base must name a preset file (base = \"tiny.py\"), got {base!r}")
    return {**(run_preset(os.path.join(os.path.dirname(path), base), seen) if base else {}), **values}


def parse_args(argv):
    """train.py's config: presets and overrides, then the defaults that depend on other keys. (With
    --resume, train.py starts from the run's saved config instead: outputs.resume_config.)"""
    (cfg,) = parse(argv, Config, usage="usage: python train.py [preset.py ...] [--key=value ...]\n")
    return resolve_defaults(cfg)
