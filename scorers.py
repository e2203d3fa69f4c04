"""
scorers.py — scores from outside models: CLIP (with its preprocessing in torch), the text-rendering (OCR)
score and the LAION aesthetic predictor. reward.py builds its rewards on them (pickscore, clip_score,
clip_sim, ocr, aesthetic and the PickScore adversary); eval.py reports the OCR accuracy of held-out prompts
that quote a text. Leaves out: which reward uses what, and their registry (reward.py).

OCR, as the published Adv-GRPO / Flow-GRPO reward computes it (their `ocr.py`):
  target   the text between the prompt's first pair of double quotes: 'a sign that reads "Open Late"'
  read     what the engine recognised (boxes of confidence ≥ 0.5, in its reading order), joined with ''
  both     spaces removed, lower-cased
  score    1 if the target is a substring of what was read, else 1 - min(Levenshtein(read, target), n) / n,
           n = len(target): in [0, 1]; 0 when the engine fails on the image or reads nothing
Engine: PaddleOCR when it is installed (the published one: lang "en", no angle classifier), else RapidOCR
(`rapidocr-onnxruntime`: the PP-OCRv4 detector and recogniser as ONNX files inside its wheel, so it runs
offline and on the CPU; the same model family, not the same weights: scores differ a little).

Departs from the published code: a prompt without a quoted text scores the worst score (0) with one warning
per prompt, where the published code stops with an IndexError; the images of a batch are read by a few
threads at once (the engine's ONNX sessions release the GIL).

Aesthetic: the LAION "improved aesthetic predictor" (sac+logos+ava1-l14-linearMSE): an MLP
768 → 1024 → 128 → 64 → 16 → 1 (no activations between the layers, dropout only in training) on the
L2-normalised CLIP ViT-L/14 image embedding; scores ≈ 1-10, ≈ 5-6 for SD3.5-M images. The published code
preprocesses with CLIPProcessor (PIL); here reward.CLIPScorer's torch preprocessing (the same resize, crop
and normalisation, equal up to interpolation rounding).
"""

import concurrent.futures
import functools
import importlib.util
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file

from model import char_tokenizer

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


# -----------------------------------------------------------------------------------------------
# CLIP (PickScore, clip_score, clip_sim, the aesthetic predictor's embedding)

# Random-weight CLIPs by name: "tiny" for tests; "vit-h-14" is PickScore's architecture (LAION CLIP-ViT-H-14:
# 632 M vision + 354 M text parameters) for rehearsals at the recipe's shapes without its weights.
CLIP_ARCHS = {
    "tiny": (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
             dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8), 16),
    "vit-h-14": (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      hidden_act="gelu"),
                 dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                      image_size=224, patch_size=14, hidden_act="gelu"), 1024),
}


def load_clip(model, processor):
    """(CLIPModel, tokenizer) by config: hub ids / folders (CLIPScorer loads them), or "random:<arch>" of
    CLIP_ARCHS with a byte-level tokenizer (tests, smoke runs, rehearsals)."""
    if not (isinstance(model, str) and model.startswith("random:")):
        return model, processor
    if model[7:] not in CLIP_ARCHS:
        raise SystemExit(f"unknown random CLIP {model!r}; known: random:{', random:'.join(CLIP_ARCHS)}")
    text, vision, dim = CLIP_ARCHS[model[7:]]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tok = char_tokenizer(77)
        cfg = transformers.CLIPConfig(
            text_config=dict(vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id, **text),
            vision_config=vision, projection_dim=dim)
        return transformers.CLIPModel(cfg), tok


def _pooled(out):
    # transformers v5 returns a model output from get_*_features, v4 a tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class CLIPScorer(nn.Module):
    """A frozen `transformers.CLIPModel` with CLIPProcessor's image preprocessing redone in torch (resize
    the short side bicubic+antialias, centre crop, CLIP mean/std; differs from PIL in the last digits),
    so images never leave the GPU. `model`/`processor` are hub ids or built objects (a CLIPModel and a
    tokenizer, or a processor holding one). Kept in float32 (the trainable part's master weights);
    runs under bf16 autocast on CUDA."""

    def __init__(self, model, processor):
        super().__init__()
        if isinstance(model, str):
            model = transformers.CLIPModel.from_pretrained(model)
        if isinstance(processor, str):
            processor = transformers.AutoTokenizer.from_pretrained(processor)
        self.model = model.float().eval().requires_grad_(False)  # CLIP-H in float32: ~4 GB, fine beside SD3
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.image_size = model.config.vision_config.image_size
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode=True):
        super().train(mode)
        self.model.eval()  # CLIP has no dropout worth training with; keep inference behaviour
        return self

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.mean.is_cuda)

    def embed_text(self, prompts):
        uniq = list(dict.fromkeys(prompts))  # a group repeats its prompt: encode each once
        tok = self.tokenizer(uniq, padding=True, truncation=True, max_length=self.tokenizer.model_max_length,
                             return_tensors="pt").to(self.mean.device)
        with torch.no_grad(), self._autocast():  # the text tower is never trained
            emb = _pooled(self.model.get_text_features(input_ids=tok.input_ids,
                                                       attention_mask=tok.attention_mask))
        emb = F.normalize(emb.float(), dim=-1)  # (U, E)
        return emb[[uniq.index(p) for p in prompts]]  # (B, E)

    def embed_images(self, images):
        S = self.image_size
        x = images.to(self.mean.device, torch.float32)  # (B, 3, H, W)
        H, W = x.shape[-2:]
        h, w = max(S, round(H * S / min(H, W))), max(S, round(W * S / min(H, W)))
        x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)  # (B, 3, h, w)
        top, left = (h - S) // 2, (w - S) // 2
        x = (x[..., top:top + S, left:left + S] - self.mean) / self.std  # (B, 3, S, S)
        with self._autocast():
            emb = _pooled(self.model.get_image_features(pixel_values=x))
        return F.normalize(emb.float(), dim=-1)  # (B, E)

    def cosine(self, images, prompts):
        return (self.embed_images(images) * self.embed_text(prompts)).sum(-1)  # (B,)


# -----------------------------------------------------------------------------------------------
# OCR

def quoted(prompt):
    """The text the prompt asks to render: between its first two double quotes (None without them)."""
    parts = prompt.split('"')
    return parts[1] if len(parts) >= 3 and parts[1].strip() else None


def levenshtein(a, b):
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def text_score(read, target):
    """The published OCR score of what the engine `read` (None: it failed) against the prompt's `target`."""
    target = target.replace(" ", "").lower()
    if read is None or not target:
        return 0.0
    read = read.replace(" ", "").lower()
    if target in read:
        return 1.0
    return 1.0 - min(levenshtein(read, target), len(target)) / len(target)


class OCREngine:
    """Reads the text in [0, 1] images (B, 3, H, W): PaddleOCR if installed, else RapidOCR. `name` says
    which one is reading; read(images) -> one string per image, '' when nothing is read, None on failure."""

    def __init__(self, engine="auto", threads=4):
        if engine == "auto":
            engine = "paddleocr" if importlib.util.find_spec("paddleocr") else "rapidocr"
        if engine == "paddleocr":
            from paddleocr import PaddleOCR  # optional: the published engine
            self.ocr = PaddleOCR(use_angle_cls=False, lang="en", show_log=False)
        elif engine == "rapidocr":
            from rapidocr_onnxruntime import RapidOCR
            self.ocr = RapidOCR()
        else:
            raise ValueError(f"OCR engine must be 'auto', 'paddleocr' or 'rapidocr', got {engine!r}")
        self.name, self.threads = engine, threads

    def _read_one(self, bgr):
        try:
            if self.name == "paddleocr":
                result = self.ocr.ocr(bgr, cls=False)[0] or []
                return "".join(text for _, (text, conf) in result if conf > 0)
            result, _ = self.ocr(bgr, use_cls=False)
            return "".join(text for _, text, _ in result or [])
        except Exception as e:  # a broken image must not stop the run: the worst score, said
            print(f"WARNING OCR failed on an image ({type(e).__name__}: {str(e)[:80]}): scored 0", flush=True)
            return None

    def read(self, images):
        x = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        bgr = [np.ascontiguousarray(im[..., ::-1]) for im in x]                 # (H, W, 3) each, BGR
        with concurrent.futures.ThreadPoolExecutor(self.threads) as pool:
            return list(pool.map(self._read_one, bgr))


@functools.cache
def ocr_engine(engine="auto"):
    """One OCREngine per kind for the process (the reward and the evaluation share it)."""
    return OCREngine(engine)


def ocr_scores(engine, images, prompts, warned=None):
    """(scores (B,), what was read) of images against their prompts' quoted texts. A prompt without one
    scores 0 and is said once (`warned`: the set of prompts already said)."""
    targets, warned = [quoted(p) for p in prompts], set() if warned is None else warned
    for p in sorted({p for p, t in zip(prompts, targets) if t is None} - warned):
        print(f"WARNING no quoted text in prompt {p[:60]!r}: its images score 0 under the ocr reward",
              flush=True)
        warned.add(p)
    read = engine.read(images)
    return torch.tensor([text_score(r, t) if t is not None else 0.0 for r, t in zip(read, targets)]), read


# -----------------------------------------------------------------------------------------------
# LAION aesthetic predictor

class AestheticHead(nn.Module):
    """The improved aesthetic predictor's MLP; its state-dict keys are the published file's
    (layers.0/2/4/6/7: the dropouts hold the odd places)."""

    def __init__(self, dim=768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128),
                                    nn.Dropout(0.2), nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16),
                                    nn.Linear(16, 1))

    def forward(self, embedding):
        return self.layers(embedding).squeeze(-1)                                     # (B,)


AESTHETIC_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                 "sac+logos+ava1-l14-linearMSE.pth")  # 3.7 MB; the file the published code ships


def load_aesthetic_head(weights=AESTHETIC_URL, dim=768):
    """The head from `weights`: a local .pth / .safetensors file, a URL (cached in torch's hub folder: offline
    runs use the cached copy), or "random" (tests, `dim` = the CLIP embedding width). One line when it
    cannot be had."""
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return AestheticHead(dim).eval()
    head = AestheticHead(dim)
    try:
        if os.path.isfile(weights) and weights.endswith(".safetensors"):
            state = load_file(weights)
        elif os.path.isfile(weights):
            state = torch.load(weights, map_location="cpu", weights_only=True)
        else:
            state = torch.hub.load_state_dict_from_url(weights, map_location="cpu", weights_only=True,
                                                       progress=False)
        head.load_state_dict(state)
    except Exception as e:
        raise SystemExit(f"aesthetic predictor weights {weights!r} could not be loaded ({type(e).__name__}: "
                         f"{str(e)[:100]}): download {AESTHETIC_URL} and pass "
                         "--aesthetic_weights=/path/to/sac+logos+ava1-l14-linearMSE.pth") from None
    return head.eval()
