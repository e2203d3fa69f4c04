"""
model.py — everything about the generator: loading SD3 / SD3.5, LoRA, prompt embeddings, EMA.

Owns
- `load_pipeline(name_or_path)`: a `StableDiffusion3Pipeline` from a hub id, a local folder, or
  *random weights* from a named architecture (`"random:sd3.5-medium"`, `"random:tiny"`), so tests and
  benchmarks never need a download.
- `add_lora` / `trainable_parameters`: LoRA through peft (the format diffusers' `load_lora_weights`
  reads) or full fine-tuning when `lora_rank=0`.
- `PromptEncoder`: text encoders run once per distinct prompt; the empty prompt "" (the CFG
  unconditional branch) is encoded once and reused forever.
- `EMA` of the trainable parameters.

- LoRA files: `export_lora` (diffusers' format, in every checkpoint's lora/), `read_lora` / `load_lora`
  (ours, or a PEFT adapter folder: the released Adv-GRPO and Flow-GRPO LoRAs), `adopt_lora` (init_lora's
  rank, alpha and target modules become the run's).

Leaves out: sampling maths (sampler.py), rewards (reward.py), the DDP set-up (train.py; build_generator
wraps the transformer once it is there), checkpoint files (checkpoint.py).

Departs from the published code: random-weight construction of the real SD3.5-M component configs
(no download needed to benchmark), and the T5 encoder can be dropped (`t5=False`): SD3 then feeds
zeros in place of the T5 tokens, exactly as diffusers does when `text_encoder_3` is None.
"""

import contextlib
import json
import os
from dataclasses import dataclass

import diffusers
import torch
import torch.nn as nn
import transformers
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       StableDiffusion3Pipeline)
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

import sampler as S
from archs import ARCHS  # plain data: --help loads no torch

# -----------------------------------------------------------------------------------------------
# The LoRA targets of the published recipe: every projection of the *joint* attention (`attn`) of both
# MMDiT streams. peft matches a target against the end of a module's dotted name, so the "attn." prefix
# keeps out the second, image-only attention (`attn2`) of SD3.5-M's 13 dual-attention blocks: 191 adapted
# Linears / 18.78 M parameters at rank 32, as published (bare "to_q" etc. would give 243 / 23.9 M).
LORA_TARGETS = tuple(f"attn.{n}" for n in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                            "add_v_proj", "to_add_out"))


def char_tokenizer(max_length, words=()):
    """A CLIP BPE tokenizer built in memory: every byte is a token, plus one token per word in `words`
    (the merges spell each word out, so "red" is one token, as in a trained vocabulary).

    Random-weight and tiny-world pipelines have no trained vocabulary; this keeps the real
    `CLIPTokenizer` code path (byte-level pre-tokeniser, </w> suffixes, BOS/EOS, padding)."""
    chars = sorted(ByteLevel.alphabet())  # the 256 byte-level symbols
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    merges = []
    for w in sorted(set(words)):
        if len(w) < 2:
            continue
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:  # ((r, e) -> re), (re, d</w>) -> red</w>
            merges.append((left, right))
            left = left + right
            vocab.setdefault(left, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)  # the highest id: CLIP's pooled token is found at argmax / eos
    return CLIPTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), model_max_length=max_length)


def random_pipeline(arch="tiny", t5=False, seed=0, device="cpu", dtype=torch.float32):
    """Build a StableDiffusion3Pipeline with random weights from a named architecture in ARCHS."""
    if arch not in ARCHS:
        raise SystemExit(f"unknown random architecture {arch!r}; known: random:{', random:'.join(ARCHS)}")
    a = ARCHS[arch]
    if "billions" in a and torch.device(device).type != "meta":  # say it before the minute it takes
        b = a["billions"][0] + t5 * a["billions"][1]
        print(f"building random:{arch}: {b:.1f} B random parameters, {b * dtype.itemsize:.0f} GB of "
              f"{torch.device(device).type} memory in {dtype}; about a minute", flush=True)
    tok = char_tokenizer(a["clip_max_length"])
    eos, bos = tok.eos_token_id, tok.bos_token_id

    def clip(cfg):
        return CLIPTextModelWithProjection(CLIPTextConfig(**cfg, max_position_embeddings=a["clip_max_length"],
                                                          eos_token_id=eos, bos_token_id=bos,
                                                          pad_token_id=eos))

    torch.manual_seed(seed)
    # Build directly on the target device/dtype: a 2.5 B transformer initialised on CPU in fp32 is slow.
    with torch.device(device):
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            parts = dict(transformer=SD3Transformer2DModel(**a["transformer"]), vae=AutoencoderKL(**a["vae"]),
                text_encoder=clip(a["clip_l"]), text_encoder_2=clip(a["clip_g"]),
                text_encoder_3=(T5EncoderModel(T5Config(**a["t5"], pad_token_id=eos, eos_token_id=eos))
                                if t5 else None),
            )
        finally:
            torch.set_default_dtype(old)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=a["shift"])
    # T5 random weights get the same char tokenizer: only token ids < vocab size matter here.
    return StableDiffusion3Pipeline(scheduler=sched, tokenizer=tok, tokenizer_2=tok,
                                    tokenizer_3=char_tokenizer(a["clip_max_length"]) if t5 else None, **parts)


def quiet_libraries():
    """Silence what is noise in our logs: diffusers' and transformers' info messages and their nested
    weight-loading progress bars (errors still show)."""
    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()


def load_pipeline(name_or_path, t5=True, device="cpu", dtype=torch.float32):
    """`"random:<arch>"` → random weights; a local folder or hub id → `from_pretrained`.

    Without network, a hub id fails fast with a message pointing at the tiny-world demo."""
    if name_or_path.startswith("random:"):
        return random_pipeline(name_or_path.split(":", 1)[1], t5=t5, device=device, dtype=dtype)
    extra = {} if t5 else dict(text_encoder_3=None, tokenizer_3=None)
    try:
        pipe = StableDiffusion3Pipeline.from_pretrained(name_or_path, dtype=dtype, **extra)
    except Exception as e:  # OSError (no network / no weights), ValueError (bad folder), ...
        where = "folder" if os.path.isdir(name_or_path) else "hub id"
        raise SystemExit(
            f"could not load the SD3 pipeline from {where} {name_or_path!r}: {type(e).__name__}: {e}\n"
            "SD3.5 needs the weights (`hf auth login` + accept the licence on the hub, or a local copy: "
            "--pretrained=/path/to/folder). To try the method without them: `make demo` (the embedded tiny "
            "world), or a smoke run on random weights: --pretrained=random:tiny --resolution=32.") from None
    return pipe.to(device)


# -----------------------------------------------------------------------------------------------
# Trainable parameters: LoRA or full fine-tuning

def add_lora(transformer, rank, alpha, targets=LORA_TARGETS, init="gaussian"):
    """Freeze the transformer and attach a LoRA adapter (peft, the format diffusers exports) on `targets`
    (peft name suffixes; a target the model lacks is refused in one line).

    rank=0 means full fine-tuning: every transformer weight trains, no adapter."""
    if rank == 0:
        transformer.requires_grad_(True)
        return transformer
    transformer.requires_grad_(False)
    try:
        transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init,
                                           target_modules=list(targets or LORA_TARGETS)))
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise SystemExit(f"LoRA targets {list(targets)}: {str(e)[:200]}") from None
    return transformer


def trainable_parameters(module):
    """The named parameters that train, in a stable order (the keys of checkpoints and of the EMA)."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def adapters_disabled(transformer):
    """The frozen base model (for the KL reference): LoRA switched off inside the block."""
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()


class Shadow:
    """A float32 copy of the trainable tensors that follows them slowly, shadow ← k·shadow + (1 - k)·params
    (`follow`), and can stand in for them: `applied` swaps it into the model in place and back (exact
    copies, no arithmetic), so what runs with it is the very modules the weights run (compiled, DDP-wrapped
    or not). For a LoRA it holds the LoRA tensors only. The EMA of evaluation and export is one;
    DiffusionNFT's old model θ_old (nft.py) is another."""

    def __init__(self, params: dict):
        self.shadow = {n: p.detach().float().clone() for n, p in params.items()}

    @torch.no_grad()
    def follow(self, params: dict, keep: float):
        for n, p in params.items():
            self.shadow[n].lerp_(p.detach().float(), 1 - keep)  # s = k·s + (1-k)·p

    @torch.no_grad()
    def _swap(self, params):
        for n, p in params.items():
            tmp = p.detach().clone()
            p.copy_(self.shadow[n])
            self.shadow[n].copy_(tmp)

    @contextlib.contextmanager
    def applied(self, params: dict):
        self._swap(params)
        try:
            yield
        finally:
            self._swap(params)

    def state_dict(self):
        return dict(self.shadow)

    def load_state_dict(self, sd):
        for n in self.shadow:
            self.shadow[n].copy_(sd[n])


class EMA(Shadow):
    """Exponential moving average of the trainable parameters, updated every `every` optimizer steps with
    the published warm-up: after optimizer step s (s = 1, 2, ...), when s % every == 0,

        decay(s) = min((1 + s) / (10 + s), max_decay)        shadow = decay·shadow + (1 - decay)·params

    so the first updates follow the weights closely and the decay reaches max_decay (0.9) from s = 81 on.
    The recipe: max_decay 0.9 every 8 steps. The published code evaluates the same formula at its global
    step counter, one step earlier ((s + 1) % every == 0), and repeats the update once per micro-batch of
    that step; here it is one update per `every` optimizer steps. Kept in float32 whatever the model dtype."""

    def __init__(self, params: dict, decay=0.9, every=8):
        super().__init__(params)
        self.decay, self.every = decay, every

    def decay_at(self, step: int) -> float:
        return min((1 + step) / (10 + step), self.decay)

    def update(self, params: dict, step: int):
        """`step`: optimizer steps taken so far, this one included."""
        if step % self.every == 0:
            self.follow(params, self.decay_at(step))


# -----------------------------------------------------------------------------------------------
# LoRA files: ours in diffusers' format (every checkpoint's lora/), PEFT's (the released LoRAs)

def export_lora(gen, path):
    """The EMA LoRA in diffusers' format: `StableDiffusion3Pipeline.from_pretrained(base)
    .load_lora_weights(path)` then samples what our eval samples (a test checks it)."""
    with gen.ema.applied(gen.params):
        layers = {k: v.float().cpu().clone() for k, v in get_peft_model_state_dict(gen.transformer).items()}
    # the metadata carries lora_alpha (else diffusers takes alpha = rank: 2x wrong here); target_modules, a
    # set, sorted: in Python's per-process hash order the file's bytes would change from run to run
    meta = gen.transformer.peft_config["default"].to_dict()
    meta["target_modules"] = sorted(meta["target_modules"])
    StableDiffusion3Pipeline.save_lora_weights(path, transformer_lora_layers=layers,
                                               transformer_lora_adapter_metadata=meta)


def read_lora(folder, what="init_lora"):
    """A LoRA folder in either published format: diffusers' (`pytorch_lora_weights.safetensors`, keys
    "transformer.<module>.lora_A.weight", rank and alpha in its metadata) or PEFT's (`adapter_config.json` +
    `adapter_model.safetensors`, keys "base_model.model.<module>.lora_A.weight": the released Adv-GRPO and
    Flow-GRPO LoRAs). Returns (settings {r, lora_alpha, target_modules}, where each is None when the file
    does not say, weights {"<module>.lora_A.weight": tensor}); refuses what it cannot read in one line."""
    diffusers_file = os.path.join(folder, "pytorch_lora_weights.safetensors")
    config_file = os.path.join(folder, "adapter_config.json")
    where = config_file
    try:
        if os.path.isfile(diffusers_file):
            with safe_open(diffusers_file, "pt") as f:
                meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
            if not isinstance(meta, dict):
                raise ValueError("its lora_adapter_metadata is not a JSON object")
            settings = {k: meta.get(f"transformer.{k}") for k in ("r", "lora_alpha", "target_modules")}
            prefix, weights_file = "transformer.", diffusers_file
        elif os.path.isfile(config_file):
            settings = json.load(open(config_file))
            if not isinstance(settings, dict):
                raise ValueError("not a JSON object")
            prefix, weights_file = "base_model.model.", os.path.join(folder, "adapter_model.safetensors")
            unsupported = [k for k in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern",
                                       "modules_to_save", "layers_to_transform") if settings.get(k)]
            if settings.get("peft_type", "LORA") != "LORA" or unsupported:  # each changes the update's maths
                raise SystemExit(f"{what} {config_file}: a {settings.get('peft_type')} adapter with "
                                 f"{', '.join(unsupported) or 'another method'}; only plain LoRA loads")
        else:
            raise SystemExit(f"{what} {folder}: neither pytorch_lora_weights.safetensors (diffusers) nor "
                             "adapter_config.json + adapter_model.safetensors (PEFT) is there")
        where = weights_file
        weights = {k.removeprefix(prefix): v for k, v in load_file(weights_file).items()}
    except (OSError, ValueError, SafetensorError) as e:
        raise SystemExit(f"{what} {where} cannot be read: {type(e).__name__}: {str(e)[:160]}") from None
    r, alpha, targets = (settings.get(k) for k in ("r", "lora_alpha", "target_modules"))
    targets = [targets] if isinstance(targets, str) else targets
    if not ((r is None or type(r) is int and r > 0) and (alpha is None or type(alpha) in (int, float)
                                                           and alpha > 0)
            and (targets is None or isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise SystemExit(f"{what} {folder}: r {r!r}, lora_alpha {alpha!r}, target_modules {targets!r}: "
                         "r must be a positive integer, lora_alpha a positive number, target_modules names")
    bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # it would sample black images and score them without an error
        raise SystemExit(f"{what} {where}: non-finite weights in {len(bad)} tensors, e.g. {bad[0]}")
    return dict(r=r, lora_alpha=alpha, target_modules=sorted(targets or []) or None), weights


def lora_settings(folder, what="init_lora"):
    """(rank, alpha, target modules or None) of a LoRA folder: its own config, else the weights' shapes
    (rank) and diffusers' assumption alpha = rank."""
    theirs, weights = read_lora(folder, what)
    ranks = {v.shape[0] for k, v in weights.items() if ".lora_A." in k}
    if not (theirs["r"] or ranks):
        raise SystemExit(f"{what} {folder}: no rank in its config and no lora_A weights")
    rank = theirs["r"] or max(ranks)
    return rank, theirs["lora_alpha"] or rank, theirs["target_modules"]


def adopt_lora(cfg, master=True):
    """init_lora: the run's LoRA becomes the adapter's (its rank, alpha and target modules), said once."""
    rank, alpha, targets = lora_settings(cfg.init_lora)
    targets = sorted(targets) if targets else cfg.lora_targets
    if (rank, alpha, targets) != (cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets):
        cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets = rank, alpha, targets
        if master:
            print(f"init_lora {cfg.init_lora}: its rank {rank}, alpha {alpha}, targets "
                  f"{targets or 'the recipe'} are this run's", flush=True)


def load_lora(transformer, folder, what="init_lora"):
    """Set our adapter to a LoRA folder of either format (`read_lora`), refusing one of another rank,
    alpha or target modules, or with weights for other layers, in one line."""
    if not getattr(transformer, "peft_config", None):
        raise SystemExit(f"{what} needs lora_rank > 0")
    theirs, weights = read_lora(folder, what)
    ours = transformer.peft_config["default"]
    r, alpha = theirs["r"] or ours.r, theirs["lora_alpha"] or ours.lora_alpha
    if (r, alpha) != (ours.r, ours.lora_alpha):  # another alpha would silently rescale the update
        raise SystemExit(f"{what} {folder} has rank {r} / alpha {alpha}: "
                         f"set --lora_rank={r} --lora_alpha={alpha}")
    if theirs["target_modules"] and set(theirs["target_modules"]) != set(ours.target_modules):
        raise SystemExit(f"{what} {folder} adapts {theirs['target_modules']}, this run "
                         f"{sorted(ours.target_modules)}: --lora_targets=\"{theirs['target_modules']}\"")
    try:
        result = set_peft_model_state_dict(transformer, weights, adapter_name="default")
    except RuntimeError as e:  # shape mismatch: another rank than its metadata says
        raise SystemExit(f"{what} {folder} does not fit lora_rank / targets of this run: "
                         f"{str(e)[:200]}") from None
    if getattr(result, "unexpected_keys", None):
        raise SystemExit(f"{what} {folder} has weights for layers this run does not adapt, e.g. "
                         f"{result.unexpected_keys[0]}")
    missing = [k for k in getattr(result, "missing_keys", []) if ".lora_" in k]
    if missing:
        raise SystemExit(f"{what} {folder} has no weights for {len(missing)} adapted tensors, "
                         f"e.g. {missing[0]}")


# -----------------------------------------------------------------------------------------------
# Prompt embeddings

class PromptEncoder:
    """Encodes prompts with the pipeline's text encoders, each distinct prompt once (in-memory cache).

    Returns (prompt_embeds (B, T, D), pooled (B, P)) on `device`. The cache lives on `cache_device`
    (default `device`; the CPU under train.py's low_mem). Once every prompt is cached the text encoders
    never run again, and `drop_text_encoders` frees them (train.py does so under low_mem).
    Each prompt is encoded alone: batched, its embedding would depend (in the last bits) on which prompts
    shared its batch, and a resumed run, which fills the cache in another order, would not be exact."""

    def __init__(self, pipe, device, max_sequence_length=128, cache_device=None):
        self.pipe, self.device, self.max_len = pipe, device, max_sequence_length
        self.cache_device = device if cache_device is None else cache_device  # "cpu" saves GPU memory
        self.cache = {}

    @torch.no_grad()
    def __call__(self, prompts):
        todo = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if todo and self.pipe.text_encoder is None:
            raise RuntimeError(f"prompt {todo[0]!r} was not encoded before the text encoders were freed "
                               "(low_mem)")
        for p in todo:
            emb, _, pooled, _ = self.pipe.encode_prompt(p, p, p, device=self.device,
                                                        do_classifier_free_guidance=False,
                                                        max_sequence_length=self.max_len)
            self.cache[p] = (emb[0].to(self.cache_device), pooled[0].to(self.cache_device))
        emb = torch.stack([self.cache[p][0] for p in prompts]).to(self.device)       # (B, T, D)
        pooled = torch.stack([self.cache[p][1] for p in prompts]).to(self.device)    # (B, P)
        return emb, pooled

    def drop_text_encoders(self):
        """Free the text encoders (T5-XXL alone is ~9 GiB in bf16) once every prompt is cached."""
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            setattr(self.pipe, name, None)


def vae_factor(pipe):
    """The VAE's downsampling factor (8 for SD3)."""
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def latent_shape(pipe, resolution):
    """(C, h, w) of one latent for square images of `resolution` pixels."""
    f = vae_factor(pipe)
    return pipe.transformer.config.in_channels, resolution // f, resolution // f


def count_params(module: nn.Module):
    return sum(p.numel() for p in module.parameters())


# -----------------------------------------------------------------------------------------------
# The generator as the loop and the evaluation use it

@dataclass
class Generator:
    """The policy and what it needs to sample and train, built once by `build_generator`."""
    pipe: StableDiffusion3Pipeline
    transformer: nn.Module      # the SD3 transformer with its LoRA adapter (or fully trainable)
    params: dict                # the trainable parameters (float32): keys of checkpoints and of the EMA
    opt: torch.optim.Optimizer
    ema: EMA
    encode: PromptEncoder
    sample_model: nn.Module     # what sampling and evaluation call (no grad; compiled when cfg.compile)
    train_model: nn.Module      # what the update calls (DDP when world > 1; compiled when cfg.compile)
    sigmas: torch.Tensor        # (N+1,) the sampling sigmas
    autocast: torch.dtype | None
    resolution: int
    decode_chunk: int           # images per VAE decode call
    device: torch.device
    old: Shadow | None = None   # objective = "nft": DiffusionNFT's old model θ_old (nft.py), else None

    def decode(self, latents):
        return S.decode_latents(self.pipe.vae, latents, self.decode_chunk)  # (B, 3, H, W) in [0, 1]

    def latent_shape(self):
        return latent_shape(self.pipe, self.resolution)


def build_generator(cfg, device, world=1):
    """Pipeline, trainable parameters, optimizer, EMA, prompt encoder, DDP / compiled wrappers."""
    bf16 = cfg.mixed_precision == "bf16"
    # Frozen weights in bf16 (memory), trainable ones float32 (Adam needs the precision). The CPU honours
    # bf16 too (autocast works there), so the bf16 path users run on GPUs is testable without one.
    pipe = load_pipeline(cfg.pretrained, t5=cfg.t5, device=device,
                         dtype=torch.bfloat16 if bf16 else torch.float32)
    for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        if m is not None:
            m.requires_grad_(False).eval()
    transformer = add_lora(pipe.transformer, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    if cfg.init_lora:
        load_lora(transformer, cfg.init_lora)
    params = trainable_parameters(transformer)
    for p in params.values():
        p.data = p.data.float()
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.eval()
    train_model = transformer
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            transformer, device_ids=[device.index] if device.type == "cuda" else None)
    sample_model = transformer
    if cfg.compile:
        # dynamic=False: a handful of batch shapes (sampling, training, eval), each compiled static, since
        # kernels specialised to the shape are faster than the dynamic-shape ones dynamo would switch to
        sample_model, train_model = (torch.compile(transformer, dynamic=False),
                                     torch.compile(train_model, dynamic=False))
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=(cfg.g_beta1, 0.999))
    return Generator(pipe=pipe, transformer=transformer, params=params, opt=opt,
                     ema=EMA(params, cfg.ema_decay, cfg.ema_every),
                     encode=PromptEncoder(pipe, device, cfg.max_sequence_length,
                                          cache_device="cpu" if cfg.low_mem else device),
                     sample_model=sample_model, train_model=train_model,
                     sigmas=S.flow_sigmas(pipe.scheduler, cfg.num_steps, device),
                     autocast=torch.bfloat16 if bf16 else None, resolution=cfg.resolution,
                     decode_chunk=4 if cfg.low_mem else 16, device=device,
                     old=Shadow(params) if cfg.objective == "nft" else None)

