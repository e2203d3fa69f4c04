"""
Rewards for nanoAdvGRPO: the adversarial DINO discriminator (the paper's main new part),
the adversarial PickScore model, fixed rewards and the registry that combines them.

What this file owns
- `DinoFeatures`: a frozen timm ViT (DINOv2-B/14 at 518² by default) turning [0,1] images into
  float32 CLS and patch tokens. Shared by the discriminator, the `dino_sim` reward and the evaluation.
- `DinoDiscriminator`: a float32 head h = Linear(D,512) -> GELU -> Linear(512,1) on those tokens, its
  hinge loss, its reward r = 0.7·h(c) + 0.3·mean_k h(p_k), and its own Adam optimizer; beside it a
  split-half pair of heads that only measures whether the reward is still signal (the run's `d_signal`).
- `PickScoreAdversary`: PickScore (scorers.CLIPScorer: CLIP with its preprocessing in torch) as a
  discriminator; it trains the last k vision layers with a Bradley–Terry loss (reference beats generation).
- `Adversary`: what both adversaries answer, so the loop never asks which one it drives:
      rewards, split, d_batch, info = adv.judge(images, real_images, prompts, pool, generator, half)
                      # no step yet; split (B, 2): two independent scores of each image, or None
      d_steps, train_g = adv.schedule(cfg, epoch, info)      # info averaged over ranks: all agree
      info = adv.update(d_batch, d_steps)                    # collectives: the same count on every rank
      adv.head_state() / adv.load_head_state(state)          # checkpoints; adv.name, .needs, .lr, .weight
- `REWARDS` / `register` / `build_reward`: fixed rewards `fn(images, prompts, metadata) -> (r, info)`,
  combined as a weighted sum. A factory *names* what it needs: `device`, `references` (a ReferenceSet) and
  `phi` (DinoFeatures) come from the run, which loads them only when a chosen reward (or the adversary:
  `needs`) names them; a parameter named like a config key gets its value; any other is a setting:
  `--reward="{'ocr': {'weight': 0.5, 'engine': 'rapidocr'}}"`.

Leaves out: when the loop calls what and the epoch's random draws (train.py), held-out metrics (eval.py).

Where we depart from the published code, and why
- The published discriminator L2-normalises tokens when scoring but not when training the head, so the
  reward reads a head on inputs it never saw. Here one private method (`_logits`) feeds both paths.
- The head is kept in float32 even when the backbone runs in bf16: bf16 keeps 8 significant bits, so an
  Adam step of lr=1e-4 on a weight of 0.05 (bf16 spacing 2.4e-4) rounds back to the same value; the
  published bf16 head barely moves.
- The published PickScore adversary is not synchronised across GPUs (each rank drifts to its own
  discriminator). Both adversaries here average their gradients over ranks before every step.
- The published `dino_sim` evaluation takes the max over *all* prompts' references; ours is paired: a
  generation is compared with its own prompt's references only (mean cosine).
- PickScore is not divided by 26 as in Flow-GRPO: group-normalised advantages do not care about scale.
"""
import inspect
import math
import os

import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import archs
import scorers
import tinyworld
from scorers import CLIPScorer, load_clip

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CONTEXT = ("device", "references", "phi")  # what the run builds for a reward factory that names it


def _all_reduce_grads_(params):
    """Average .grad over ranks in one collective, so every rank takes the identical Adam step and the
    discriminator stays synchronised. Not DDP: the head is applied four times per loss (CLS/patches ×
    real/fake), which plain DDP does not allow within one backward, and DDP would also hook the frozen
    backbone. Every rank must call this the same number of times (it is a collective)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    params = list(params)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])  # (n_params,)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def _gather(t):
    """(n, ...) of this rank -> (world·n, ...) of all ranks, in rank order (itself on one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t.detach().clone()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    return torch.cat(parts)


class Adversary:
    """The interface of the module docstring. judge: real_images[i] is a reference of prompts[i], pool (B, P)
    the prompts' pooled text embeddings, generator the adversary's random draws of the epoch, half (B,) 0/1
    which of a split-half pair learns from image i; split: each image's score under two discriminators
    trained on disjoint halves (None: not measured); info: loss and accuracy before any step. `name`: its
    key in cfg.reward; `lr`: kept when a checkpoint's optimizer state is loaded (a changed lr on --resume
    is applied); `weight`: in the reward sum (build_adversary)."""
    name, needs, weight = "", (), 1.0

    def update(self, d_batch, steps):
        """`steps` steps on this epoch's inputs (each all-reduces its gradients: every rank must take the
        same number). Returns the last step's loss to log."""
        info = {}
        for _ in range(steps):
            info = dict(d_loss=self.d_step(**d_batch)["d_loss"])
        return info

    def _load_opt(self, state, opt=None):
        opt = opt or self.opt
        opt.load_state_dict(state)
        for group in opt.param_groups:
            group["lr"] = self.lr


# -----------------------------------------------------------------------------
# DINO features and the adversarial DINO discriminator

class DinoFeatures(nn.Module):
    """Frozen ViT φ: [0,1] images of any size -> (global token (B,D), patch tokens (B,N,D)), both float32.
    `backbone` is a timm ViT: forward_features(x) -> (B, n_prefix + N, D), `num_prefix_tokens` counting the
    class token and any registers. The global token is what the model itself pools: its class token where it
    has one (DINOv2; DINOv3, whose 4 registers are skipped), else its own pooled output — forward_head(...,
    pre_logits=True): SigLIP's attention pool, as the published SigLIP discriminator reads the vision model's
    pooled output. A backbone whose tokens cannot be split so is refused in one line. To run φ in bf16:
    `feats.backbone.to(torch.bfloat16)`; inputs follow the backbone's dtype, outputs are float32."""

    def __init__(self, backbone, image_size=518):
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        cfg = getattr(backbone, "pretrained_cfg", None) or {}
        self.register_buffer("mean", torch.tensor(cfg.get("mean", IMAGENET_MEAN)).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", IMAGENET_STD)).view(1, 3, 1, 1),
                             persistent=False)
        self.image_size = image_size
        self.n_prefix = getattr(backbone, "num_prefix_tokens", 1)
        self.has_cls = getattr(backbone, "cls_token", None) is not None
        name = type(backbone).__name__
        if not hasattr(backbone, "forward_features") or not (self.has_cls or hasattr(backbone,
                                                                                   "forward_head")):
            raise SystemExit(f"feature backbone {name}: its tokens cannot be split into a global token and "
                             "patch tokens (needs timm's forward_features, a class token or forward_head)")

    def train(self, mode=True):
        super().train(mode)
        self.backbone.eval()  # frozen means frozen: no dropout / drop-path even inside disc.train()
        return self

    @torch.no_grad()
    def forward(self, images):
        S = self.image_size
        x = images.to(self.mean.device, torch.float32)  # (B, 3, H, W)
        if x.shape[-2:] != (S, S):
            x = F.interpolate(x, size=(S, S), mode="bicubic", antialias=True,
                              align_corners=False)  # (B, 3, S, S)
        x = (x - self.mean.float()) / self.std.float()
        dtype = next(self.backbone.parameters()).dtype
        tokens = self.backbone.forward_features(x.to(dtype))  # (B, n_prefix + N, D)
        if tokens.dim() != 3:
            raise SystemExit(f"feature backbone {type(self.backbone).__name__} gives features of shape "
                             f"{tuple(tokens.shape)}, not tokens (B, n, D): use a ViT")
        pooled = tokens[:, 0] if self.has_cls else self.backbone.forward_head(tokens, pre_logits=True)
        return pooled.float(), tokens[:, self.n_prefix:].float()  # (B, D), (B, N, D)


class DinoDiscriminator(Adversary, nn.Module):
    """The adversarial reward: a small head on frozen DINO tokens, trained with a hinge loss to tell
    reference images (real) from current generations (fake); its score of a generation is the reward.

    φ is the expensive part: `judge` computes features once per image per epoch, `score` and `d_step` reuse
    them (disc.score(*disc.features(images)) -> rewards (B,); disc.d_step(real_feats, fake_feats)).

    Its health (beyond the paper): `pair`, two more heads like the paper's, each trained on its half of every
    batch (`half`: 0 / 1 per image, with its reference), used for nothing but to measure. `judge` returns
    their two scores of each generation, from which train.reward_signal estimates how much of the reward's
    within-group spread is signal: two discriminators that learnt from disjoint data agree on what tells
    generations from references, not on what each happened to fit.

    Checkpoints: `head_state()` / `load_head_state()` (heads + Adam; `state_dict()` would hold the frozen
    backbone too). Do not `disc.to(torch.bfloat16)`: cast `disc.backbone` only (d_step refuses a bf16 head).
    The heads are initialised from `seed`, not the global RNG: the same on every rank. `group_size`: see
    `wrong_prompt` (a conditional head only)."""
    name, needs = "dino_adv", ("references", "phi")

    def __init__(self, phi: DinoFeatures, hidden=512, n_patches=64, patch_loss_weight=0.3,
                 cls_reward_weight=0.7, lr=1e-4, betas=(0.5, 0.999), seed=0, cond_dim=0, group_size=1,
                 replay=0, r1=0.0):
        super().__init__()
        self.phi = phi  # may be shared with the dino_sim reward
        D = getattr(phi.backbone, "num_features", None) or phi.backbone.embed_dim
        with torch.random.fork_rng(devices=[]):  # same head on every rank (from `seed`), global RNG untouched
            torch.manual_seed(seed)
            self.head = nn.Sequential(nn.Linear(D, hidden), nn.GELU(), nn.Linear(hidden, 1)).float()
            # Beyond the paper (cond_dim > 0): a projection discriminator. The CLS logit gains a term
            # <W·e, GELU(h_1(c))>, e = the prompt's pooled text embedding (unit norm), so "right image, wrong
            # prompt" can be told from "right image, right prompt". W starts at zero: the paper's head.
            self.proj = nn.Linear(cond_dim, hidden, bias=False).float() if cond_dim else None
            if self.proj is not None:
                nn.init.zeros_(self.proj.weight)
            torch.manual_seed(seed + 1_000_003)  # the split-half pair: unconditional, its own draws
            self.pair = nn.ModuleList(nn.Sequential(nn.Linear(D, hidden), nn.GELU(), nn.Linear(hidden, 1))
                                      for _ in range(2)).float()
        self.n_patches, self.patch_loss_weight, self.cls_reward_weight = (n_patches, patch_loss_weight,
                                                                          cls_reward_weight)
        self.lr, self.group_size = lr, group_size
        self.opt = torch.optim.Adam(self.trainable_parameters(), lr=lr, betas=betas)
        self.pair_opt = torch.optim.Adam(self.pair.parameters(), lr=lr, betas=betas)
        # replay > 0 (beyond the paper): the (CLS, drawn patch tokens) of every image of the last `replay`
        # epochs, gathered from all ranks (so rank 0's checkpoint holds them), oldest first
        self.replay, self.pool = replay, []
        self.r1 = r1  # > 0 (beyond the paper): γ of the R1 penalty γ/2·|∇h|² at the references (d_loss)

    @classmethod
    def from_config(cls, cfg, device, phi, cond_dim=0):
        """`cond_dim`: the pooled text embedding's width, used when cfg.d_conditional."""
        return cls(phi, cfg.d_hidden, cfg.d_patches, cfg.d_patch_loss, cfg.d_cls_weight, cfg.d_lr,
                   seed=cfg.seed, cond_dim=cond_dim * cfg.d_conditional, group_size=cfg.group_size,
                   replay=cfg.d_replay, r1=cfg.d_r1).to(device)

    def trainable_parameters(self):
        return [*self.head.parameters(), *(self.proj.parameters() if self.proj is not None else ())]

    @property
    def backbone(self):
        return self.phi.backbone

    def features(self, images):
        return self.phi(images)  # (B, D), (B, N, D) float32, no grad

    def _cls_logit(self, cls, cond=None):
        if self.proj is None:
            return self.head(cls.float()).squeeze(-1)                              # (B,)
        hidden = self.head[1](self.head[0](cls.float()))                           # (B, hidden)
        e = F.normalize(cond.float(), dim=-1)                                      # (B, P)
        return self.head[2](hidden).squeeze(-1) + (self.proj(e) * hidden).sum(-1)  # (B,)

    def _draw(self, patches, generator=None):
        """n_patches patch tokens (B, k, D) drawn at random per image, all of them if N <= n_patches.
        `generator`: one for the batch, or a list of one per image (its own draw)."""
        B, N, D = patches.shape
        if N <= self.n_patches:
            return patches
        gens = generator if isinstance(generator, list) else [generator] * B
        idx = torch.stack([torch.rand(N, generator=g, device=g.device if g else "cpu") for g in gens]
                          ).argsort(dim=1)[:, :self.n_patches]                                      # (B, k)
        return patches.gather(1, idx.to(patches.device)[..., None].expand(-1, -1, D))          # (B, k, D)

    def _logits(self, cls, patches, cond=None, generator=None):
        """The single token path of both the reward and the loss: head logits of the CLS token and of
        n_patches patch tokens drawn at random per image (_draw). `cond` (B, P): the prompts' pooled text
        embeddings, used (and required) by a conditional head only."""
        drawn = self._draw(patches, generator)
        return self._cls_logit(cls, cond), self.head(drawn.float()).squeeze(-1)  # (B,), (B, k)

    def _combine(self, cls_logit, patch_logits):
        w = self.cls_reward_weight
        return w * cls_logit + (1 - w) * patch_logits.mean(dim=1)  # (B,)

    @torch.no_grad()
    def score(self, cls, patches, cond=None, generator=None):
        """Reward from precomputed features: 0.7·h(c) + 0.3·mean_k h(p_k). Never differentiated."""
        return self._combine(*self._logits(cls, patches, cond, generator=generator))  # (B,)

    def d_loss_from_features(self, real_feats, fake_feats, generator=None, wrong=None, half=None,
                             replay=None):
        """Hinge loss, each term averaged over its own batch (reals and fakes may differ in number):
        L_D = ½[relu(1-h(c_r)) + relu(1+h(c_f))] + λ_p·½[mean_k relu(1-h(p_r,k)) + mean_k relu(1+h(p_f,k))].
        Feature tuples are (cls, patches) or, for a conditional head, (cls, patches, text embedding).
        `wrong` (conditional head only): (cls, text embedding) of reference images paired with *another*
        prompt — a real image of the wrong prompt counts as fake, half of the CLS fake term (the
        matching-aware loss of text-to-image GANs); patch tokens stay unconditional.
        `half` (B,) 0/1: the split-half pair's losses are added, each of its heads on its half of the
        images and their references, on the same drawn patch tokens (they share no parameter with `head`).
        `replay` (CLS (Bf, D), patch tokens (Bf, k, D)) of past generations: more fakes, beside the new ones
        in the paper's head's loss. info: d_loss (the paper's head alone), d_acc (CLS logits on the right
        side of 0), d_real / d_fake (mean reward-formula score) and their mean squares, all on the new
        generations."""
        (cls_r, pat_r, *cond_r), (cls_f, pat_f, *cond_f) = real_feats, fake_feats
        pat_r, pat_f = self._draw(pat_r, generator), self._draw(pat_f, generator)  # (Br, k, D), (Bf, k, D)
        r1 = self.r1 > 0 and torch.is_grad_enabled()
        if r1:  # the penalty differentiates the logits with respect to the reference tokens
            cls_r, pat_r = cls_r.detach().requires_grad_(True), pat_r.detach().requires_grad_(True)
        c_r, p_r = self._cls_logit(cls_r, *cond_r), self.head(pat_r).squeeze(-1)  # (Br,), (Br, k)
        c_f, p_f = self._cls_logit(cls_f, *cond_f), self.head(pat_f).squeeze(-1)  # (Bf,), (Bf, k)
        correct = (c_r > 0).sum() + (c_f < 0).sum()
        real, fake = self._combine(c_r, p_r), self._combine(c_f, p_f)                    # (Br,), (Bf,)
        info = dict(d_acc=correct.item() / (len(c_r) + len(c_f)), d_real=real.mean().item(),
                    d_fake=fake.mean().item(), d_real_sq=(real ** 2).mean().item(),
                    d_fake_sq=(fake ** 2).mean().item())  # averaged over ranks: exact moments (train.gap)
        if replay is not None:
            c_f = torch.cat([c_f, self.head(replay[0]).squeeze(-1)])                              # (2Bf,)
            p_f = torch.cat([p_f, self.head(replay[1]).squeeze(-1)])                           # (2Bf, k)
        fake_term = F.relu(1 + c_f).mean()
        if wrong is not None and len(wrong[0]):
            fake_term = 0.5 * (fake_term + F.relu(1 + self._cls_logit(*wrong)).mean())
        loss = self._hinge(c_r, p_r, fake_term, p_f)
        info["d_loss"] = loss.item()
        if r1:  # R1 (Mescheder et al. 2018): the head flat at the references, so that their score is a
            # peak the generator climbs to, not a slope it is rewarded to run past (GAIL/AMP practice)
            g_c, g_p = torch.autograd.grad([c_r.sum(), p_r.sum()], [cls_r, pat_r], create_graph=True)
            loss = loss + self.r1 / 2 * (g_c.pow(2).sum(-1).mean()
                                         + self.patch_loss_weight * g_p.pow(2).sum(-1).mean())
        for k, h in enumerate(self.pair if half is not None else ()):
            r, f = half.to(cls_r.device) == k, half.to(cls_f.device) == k
            loss = loss + self._hinge(h(cls_r[r]).squeeze(-1), h(pat_r[r]).squeeze(-1),
                                      F.relu(1 + h(cls_f[f]).squeeze(-1)).mean(), h(pat_f[f]).squeeze(-1))
        return loss, info

    def _hinge(self, c_r, p_r, fake_term, p_f):
        loss_cls = 0.5 * (F.relu(1 - c_r).mean() + fake_term)
        loss_patch = 0.5 * (F.relu(1 - p_r).mean() + F.relu(1 + p_f).mean())
        return loss_cls + self.patch_loss_weight * loss_patch

    def d_step(self, real_feats, fake_feats, generator=None, wrong=None, half=None, replay=None):
        """One Adam step on the head (and, given `half`, on the split-half pair); gradients are averaged
        over ranks first (all-reduce, mean) when torch.distributed runs with world > 1 — this is what keeps
        the heads synchronised."""
        assert self.head[0].weight.dtype == torch.float32, (
            "keep the head float32: cast disc.backbone, not disc")
        self.opt.zero_grad(set_to_none=True)
        self.pair_opt.zero_grad(set_to_none=True)
        loss, info = self.d_loss_from_features(real_feats, fake_feats, generator, wrong, half, replay)
        loss.backward()
        _all_reduce_grads_([*self.trainable_parameters(), *self.pair.parameters()])
        self.opt.step()
        if half is not None:
            self.pair_opt.step()
        return info

    def wrong_prompt(self, real_cls, pool, prompts):
        """The conditional head's extra fakes: (CLS (M, D), text embedding (M, P)) of references under the
        prompt `group_size` images on, the next group's (a different prompt, mostly: pairs that share
        their prompt are dropped)."""
        other = torch.arange(len(prompts)).roll(-self.group_size)
        keep = torch.tensor([prompts[i] != prompts[j] for i, j in enumerate(other.tolist())])
        return real_cls[other[keep]], pool[keep.to(pool.device)]

    @torch.no_grad()
    def judge(self, images, real_images, prompts, pool, generator, half=None):
        fake, real = self.features(images), self.features(real_images)          # φ: once per image
        wrong = None
        if self.proj is not None:  # each image with its prompt's text embedding
            fake, real = (*fake, pool), (*real, pool)
            wrong = self.wrong_prompt(real[0], pool, prompts)
        drawn = self._draw(fake[1], generator)                                     # (B, k, D)
        r = self._combine(self._cls_logit(fake[0], *fake[2:]), self.head(drawn).squeeze(-1))     # (B,)
        split = torch.stack([self._combine(h(fake[0]).squeeze(-1), h(drawn).squeeze(-1)) for h in self.pair],
                            dim=1)                                                 # (B, 2)
        _, info = self.d_loss_from_features(real, fake, generator=generator, wrong=wrong)
        # how close the generations are to the references in φ's own terms (the mean cosine of each with
        # the reference drawn for it): a fixed yardstick beside the moving head, for the run's health
        info["ref_sim"] = F.cosine_similarity(fake[0], real[0], dim=-1).mean().item()
        return r, split, dict(real_feats=real, fake_feats=fake, generator=generator, wrong=wrong,
                              half=half, replay=self._replay(fake[0], drawn, generator)), info

    def _replay(self, cls, drawn, generator):
        """replay > 0: for each image of this rank, the same image index of an earlier epoch, drawn from the
        pool per image (its own generator); then this epoch's images join the pool. None when off or empty.
        Every rank holds the whole pool (all-gathered), so the draw is the same on any number of ranks."""
        if not self.replay:
            return None
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        ids = torch.arange(len(cls)) + rank * len(cls)  # the images' indices in the epoch
        out = None
        if self.pool:
            gens = generator if isinstance(generator, list) else [generator] * len(cls)
            ago = torch.tensor([int(torch.randint(len(self.pool), (1,), generator=g)) for g in gens])
            out = tuple(torch.stack([self.pool[a][k][i] for a, i in zip(ago.tolist(), ids.tolist())])
                        .to(cls.device) for k in (0, 1))                      # (B, D), (B, k, D)
        self.pool = [*self.pool, (_gather(cls), _gather(drawn))][-self.replay:]
        return out

    def schedule(self, cfg, epoch, info):
        """The paper's alternation (cfg.schedule), after d_warmup epochs in which the head learns first.
        d_steps_max > 0 (beyond the paper): outside the warm-up, a step count read off the head's accuracy
        on this epoch's new generations and references (info["d_acc"], before any step: held-out for it, and
        the same on every rank) — d_steps_max below 0.6 (it has lost track), none above 0.8 (it wins
        outright, the state in which an adversarial reward stops transferring anything), else d_steps."""
        steps = cfg.d_steps
        if cfg.d_steps_max and epoch >= cfg.d_warmup:
            steps = cfg.d_steps_max if info["d_acc"] < 0.6 else 0 if info["d_acc"] > 0.8 else cfg.d_steps
        if epoch < cfg.d_warmup:                          # G waits
            return steps, False
        if cfg.schedule == "paper":                       # D-only epochs, G every d_times-th
            g = (epoch + 1) % cfg.d_times == 0
            return (0 if g else steps), g
        return (steps if cfg.schedule == "shared" else 0), True   # shared: both; frozen: G alone

    def head_state(self):
        state = {"head": self.head.state_dict(), "opt": self.opt.state_dict(), "pair": self.pair.state_dict(),
                 "pair_opt": self.pair_opt.state_dict()}
        if self.replay:
            state["pool"] = [t.cpu() for epoch in self.pool for t in epoch]  # cls, patches of each epoch
        if self.proj is not None:
            state["proj"] = self.proj.state_dict()
        return state

    def load_head_state(self, state):
        self.head.load_state_dict(state["head"])
        if self.proj is not None:
            self.proj.load_state_dict(state["proj"])
        self._load_opt(state["opt"])
        flat = [t.to(self.head[0].weight.device) for t in state.get("pool", [])]
        self.pool = list(zip(flat[::2], flat[1::2]))
        if "pair" in state:  # checkpoints from before the split-half pair: it starts afresh
            self.pair.load_state_dict(state["pair"])
            self._load_opt(state["pair_opt"], self.pair_opt)


def make_backbone(name, image_size=518, weights="", timm_kwargs=None):
    """The frozen feature backbone by config: a timm name (hub weights, or a local `weights` file, with
    optional architecture kwargs), "random:tiny" — a 2-layer DINOv2-style ViT with random weights, for
    tests and smoke runs — or "random:<timm name>", that architecture with random weights (bench.py)."""
    kw = dict(timm_kwargs or {})
    if name.startswith("random:"):
        arch = name.split(":", 1)[1]
        if arch == "tiny":
            arch, kw = "vit_small_patch14_dinov2", dict(patch_size=7, embed_dim=32, depth=2, num_heads=2)
        # DINOv2's (and DINOv3's) LayerScale init 1e-5 makes a random model's CLS the same for every image
        if "dinov2" in arch or "dinov3" in arch:
            kw.setdefault("init_values", 1.0)
        with torch.random.fork_rng(devices=[]):  # identical on every rank, global RNG untouched
            torch.manual_seed(0)
            return timm.create_model(arch, pretrained=False, num_classes=0, img_size=image_size, **kw)
    if weights:  # a local file (offline clusters) through timm's usual loading path
        kw["pretrained_cfg_overlay"] = dict(file=weights)
    try:
        return timm.create_model(name, pretrained=True, num_classes=0, img_size=image_size, **kw)
    except Exception as e:
        raise SystemExit(f"could not load the feature backbone {name!r} ({type(e).__name__}: {e}). Offline? "
                         "Pass --dino_weights=/path/to/model.safetensors, or try `make demo`.") from None


def make_features(cfg, device):
    """φ of the config on `device`; in bf16 when the run is (the heads on top stay float32)."""
    phi = DinoFeatures(make_backbone(cfg.dino_backbone, cfg.dino_image_size, cfg.dino_weights,
                                     cfg.dino_kwargs), cfg.dino_image_size).to(device)
    if cfg.mixed_precision == "bf16":
        phi.backbone.to(torch.bfloat16)
    return phi


# -----------------------------------------------------------------------------
# The adversarial PickScore model (CLIP scoring itself: scorers.CLIPScorer)

class PickScoreAdversary(Adversary, CLIPScorer):
    """PickScore (= logit_scale.exp() · cos(text, image), ≈ 22 for SD3.5-M images) used as a discriminator:
    only the last `train_last_k` vision encoder layers train, in float32 (train_last_k=0 gives the frozen
    `pickscore` reward). The final layer norm and the visual projection stay frozen: they map into the
    embedding space shared with the (frozen) text tower. Its schedule is the published trigger: when the
    generations out-score the references (means over all ranks) it steps and the generator waits.
    Checkpoints: head_state() / load_head_state() hold the trainable tensors and Adam state only."""
    name, needs = "pickscore_adv", ("references",)

    def __init__(self, model="yuvalkirstain/PickScore_v1", processor="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                 train_last_k=1, lr=5e-6, betas=(0.5, 0.999)):
        super().__init__(model, processor)
        self.lr = lr
        vm = self.model.vision_model
        parts = vm.encoder.layers[len(vm.encoder.layers) - train_last_k:] if train_last_k > 0 else []
        self.trainable = [p for m in parts for p in m.parameters()]
        for p in self.trainable:
            p.requires_grad_(True)
        self.opt = torch.optim.Adam(self.trainable, lr=lr, betas=betas) if self.trainable else None

    def score(self, images, prompts):
        return self.model.logit_scale.exp().float() * self.cosine(images, prompts)  # (B,)

    @torch.no_grad()
    def reward(self, images, prompts):
        return self.score(images, prompts)  # (B,)

    @staticmethod
    def should_train_d(gen_mean: float, ref_mean: float) -> bool:
        """Trigger: D steps (and G skips) when generations out-score references. The caller passes means
        already all-reduced over ranks, so every rank takes the same branch (d_step is a collective)."""
        return gen_mean > ref_mean

    @classmethod
    def from_config(cls, cfg, device, phi=None, cond_dim=0):
        model, tokenizer = load_clip(cfg.pickscore_model, cfg.pickscore_processor)
        return cls(model, tokenizer, cfg.pickscore_train_last_k, cfg.pickscore_lr).to(device)

    def judge(self, images, real_images, prompts, pool, generator, half=None):
        r, ref_r = self.reward(images, prompts), self.reward(real_images, prompts)
        info = dict(d_real=ref_r.mean().item(), d_fake=r.mean().item(),
                    d_acc=(ref_r > r).float().mean().item())
        return r, None, dict(ref_images=real_images, gen_images=images, prompts=prompts), info

    def schedule(self, cfg, epoch, info):
        d = self.should_train_d(info["d_fake"], info["d_real"])
        return int(d), not d

    def d_step(self, ref_images, gen_images, prompts):
        """Bradley–Terry on each pair (ref_i, gen_i) of prompt_i: two-way cross entropy over their scores with
        the reference as winner. Gradients averaged over ranks, then Adam."""
        self.opt.zero_grad(set_to_none=True)
        s_ref, s_gen = self.score(ref_images, prompts), self.score(gen_images, prompts)  # (B,), (B,)
        logits = torch.stack([s_ref, s_gen], dim=1)  # (B, 2): the reference is class 0
        loss = F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))
        loss.backward()
        _all_reduce_grads_(self.trainable)
        self.opt.step()
        return dict(d_loss=loss.item(), d_acc=(s_ref > s_gen).float().mean().item())

    def head_state(self):
        return {"trainable": [p.detach().clone() for p in self.trainable], "opt": self.opt.state_dict()}

    def load_head_state(self, state):
        with torch.no_grad():
            for p, q in zip(self.trainable, state["trainable"]):
                p.copy_(q)
        self._load_opt(state["opt"])


# -----------------------------------------------------------------------------
# Fixed rewards and the registry
# A factory names what it needs as parameters (CONTEXT, config keys, its own settings) and returns
# fn(images (B,3,H,W) in [0,1], prompts, metadata) -> (rewards float32 (B,), info {str: float}).

REWARDS = {}


def register(name):
    def deco(factory):
        REWARDS[name] = factory
        return factory
    return deco


@register("brightness")
def brightness():
    """Mean pixel value: a trivial real reward for tests and reward-hacking demos."""
    def fn(images, prompts, metadata):
        return images.float().mean(dim=(1, 2, 3)), {}  # (B,)
    return fn


@register("dino_sim")
def dino_sim(references, phi):
    """Paired similarity: mean cosine of the DINO CLS of a generation with each of *its own prompt's*
    references. `phi`: a DinoFeatures (the discriminator's, when there is one). Reference features are
    fixed, so they are computed once per prompt and cached."""
    cache = {}

    def fn(images, prompts, metadata):
        for p in set(prompts) - cache.keys():
            cache[p] = phi(references.images_of(p))[0]  # (k, D)
        return paired_cosine(phi(images)[0], prompts, cache).to(images.device), {}
    return fn


def paired_cosine(cls, prompts, ref_cls):
    """Mean cosine of each generation's CLS (B, D) with the CLS of *its own prompt's* references,
    ref_cls {prompt: (k, D)}: the paired DINO similarity of the training reward and of the evaluation."""
    g = F.normalize(cls.float(), dim=-1)
    return torch.stack([(F.normalize(ref_cls[p].float(), dim=-1) @ g[i]).mean()
                        for i, p in enumerate(prompts)])


@register("toy_geneval")
def toy_geneval():
    """Shapes world only (tinyworld.py): 1 if the exact analyser finds what the prompt asks for (colour,
    shape, position, one object), else 0 — a GenEval-style rule reward. An oracle for the toy world: it
    measures what the held-out toy GenEval measures, so it shows how far the generator side can go."""
    def fn(images, prompts, metadata):
        return torch.tensor([float(tinyworld.analyse(im, p)["correct"])
                             for im, p in zip(images.float().cpu(), prompts, strict=True)]), {}
    return fn


@register("pickscore")
def pickscore(device="cpu", pickscore_model="yuvalkirstain/PickScore_v1",
              pickscore_processor="laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):
    """Frozen PickScore (raw scale, ≈ 20; Flow-GRPO divides by 26, which advantages do not notice)."""
    scorer = PickScoreAdversary(*load_clip(pickscore_model, pickscore_processor), train_last_k=0).to(device)

    def fn(images, prompts, metadata):
        return scorer.reward(images, prompts).to(images.device), {}
    return fn


@register("clip_score")
def clip_score(device="cpu", clip_model="openai/clip-vit-large-patch14", clip_processor=None):
    """Raw cosine of CLIP image and text embeddings, in [-1, 1] like dino_sim. CLIPScore's ×100 (or ×2.5)
    scale is a weight in build_reward, e.g. {"clip_score": 100.0}."""
    scorer = CLIPScorer(*load_clip(clip_model, clip_processor or clip_model)).to(device)

    def fn(images, prompts, metadata):
        with torch.no_grad():
            return scorer.cosine(images, prompts).to(images.device), {}
    return fn


@register("clip_sim")
def clip_sim(references, device="cpu", clip_model="openai/clip-vit-large-patch14"):
    """Paired CLIP similarity to references: the mean cosine of a generation's CLIP image embedding with
    those of *its own prompt's* references — sim_CLIP(x_g, x_r), the paper's partner of a rule reward
    (its text rendering: λ·R_ocr + (1 - λ)·sim_CLIP, e.g. {"ocr": 0.5, "clip_sim": 0.5})."""
    clip, cache = CLIPScorer(*load_clip(clip_model, clip_model)).to(device), {}

    def fn(images, prompts, metadata):
        with torch.no_grad():
            for p in set(prompts) - cache.keys():
                cache[p] = clip.embed_images(references.images_of(p).to(device))  # (k, E), unit norm
            return paired_cosine(clip.embed_images(images), prompts, cache).to(images.device), {}
    return fn


@register("ocr")
def ocr(engine="auto"):
    """Text rendering, the published OCR reward (scorers.py): 1 when the prompt's quoted text is read in the
    image, else 1 - edit distance / its length; 0 when the engine fails or the prompt quotes nothing.
    `engine`: "auto" (PaddleOCR if installed, else RapidOCR), "paddleocr" or "rapidocr"."""
    reader, warned = scorers.ocr_engine(engine), set()
    print(f"ocr reward: read by {reader.name}", flush=True)

    def fn(images, prompts, metadata):
        r, _ = scorers.ocr_scores(reader, images, prompts, warned)
        return r.to(images.device), {f"engine_{reader.name}": 1.0}  # logged: which engine scored
    return fn


@register("aesthetic")
def aesthetic(device="cpu", clip_model="openai/clip-vit-large-patch14",
              aesthetic_weights=scorers.AESTHETIC_URL):
    """The LAION aesthetic predictor (scorers.py) on the CLIP ViT-L/14 image embedding: ≈ 1-10."""
    clip = CLIPScorer(*load_clip(clip_model, clip_model)).to(device)
    head = scorers.load_aesthetic_head(aesthetic_weights, clip.model.config.projection_dim).to(device)

    def fn(images, prompts, metadata):
        with torch.no_grad():
            return head(clip.embed_images(images)).float(), {}
    return fn


# -----------------------------------------------------------------------------
# cfg.reward: {name: weight} or {name: {"weight": w, **settings}}, adversaries included

ADVERSARIES = {a.name: a for a in (DinoDiscriminator, PickScoreAdversary)}


def _split(value):
    """cfg.reward's value for one reward, w or {"weight": w, **settings} -> (w, settings)."""
    value = value if isinstance(value, dict) else {"weight": value}
    return value.get("weight"), {k: v for k, v in value.items() if k != "weight"}


def check_reward(spec):
    """None if cfg.reward is well formed, else one line naming the reward and what is wrong with it."""
    for name, value in spec.items():
        if name not in REWARDS and name not in ADVERSARIES:
            return f"unknown reward {name!r}; known: {sorted(REWARDS) + list(ADVERSARIES)}"
        weight, settings = _split(value)
        if type(weight) not in (int, float) or not math.isfinite(weight):
            return f"reward weight of {name!r} must be a number, got {weight!r} ({{'weight': w, ...}} or w)"
        own = {} if name in ADVERSARIES else {p: q.default for p, q in inspect.signature(
            REWARDS[name]).parameters.items() if p not in CONTEXT}  # its settings and their defaults
        if bad := sorted(set(settings) - set(own)):
            return f"reward {name!r} has no setting {bad[0]!r} (its settings: {', '.join(own) or 'none'})"
        for key, v in settings.items():  # of its default's kind (an int may stand for a float)
            if (d := own[key]) not in (None, inspect.Parameter.empty) and not (
                    isinstance(v, type(d)) or type(d) is float and type(v) is int):
                return f"reward {name!r}: {key} must be a {type(d).__name__} like {d!r}, got {v!r}"
    if all(_split(v)[0] == 0 for v in spec.values()):
        return (f"{'every reward weight is 0' if spec else 'reward is empty'}: every image would score 0 and "
                "nothing would be learnt (e.g. --reward=\"{'dino_adv': 1.0}\")")
    if len(named := [n for n in spec if n in ADVERSARIES]) > 1:
        return f"at most one adversarial reward, got {' and '.join(named)}: each trains its own head"
    return None


def check_config(cfg, world=1):
    """The rewards' part of the config check: (one line of what is wrong or None, warnings to print)."""
    if bad := check_reward(cfg.reward):
        return bad, []
    dino = DinoDiscriminator.name in cfg.reward
    for key in ("d_conditional", "d_replay", "d_steps_max", "d_r1"):
        if getattr(cfg, key) and not dino:
            return (f"{key} is an option of the {DinoDiscriminator.name} discriminator, "
                    "which cfg.reward lacks", [])
    if cfg.d_replay and cfg.d_conditional:
        return "d_replay keeps unconditional fakes: not with d_conditional", []
    warnings = [] if world == 1 or not cfg.d_conditional else [
        f"d_conditional on {world} ranks: its wrong-prompt references are paired within a rank, so the run "
        "depends on the number of ranks (every other setting trains the same weights on any number)"]
    if dino and not any(e >= cfg.d_warmup and (cfg.schedule != "paper" or (e + 1) % cfg.d_times == 0)
                        for e in range(cfg.epochs)):  # its schedule is known in advance (PickScore's is not)
        why = (f"epochs = {cfg.epochs} ≤ d_warmup = {cfg.d_warmup}" if cfg.epochs <= cfg.d_warmup else
               f"schedule 'paper' trains it where (epoch + 1) % d_times = 0 (d_times = {cfg.d_times})")
        warnings.append(f"the generator will never be trained (0 G steps): {why}; "
                        "only the discriminator learns")
    return None, warnings


def missing_weights(cfg):
    """The outside models the chosen rewards need that cannot be had offline (HF_HUB_OFFLINE=1 and not in
    the hub or torch cache): lines for train.py to say with the other missing inputs, before the generator
    loads. Online, what is missing is downloaded."""
    if not archs.hub_offline():
        return []
    out, names = [], set(cfg.reward)

    def cached(repo, *files):
        return (os.path.isdir(repo) or repo.startswith("random:")
                or any(archs.hub_file(repo, f) for f in files))
    if "phi" in needs(cfg.reward) and not cfg.dino_weights and not cfg.dino_backbone.startswith("random:"):
        try:
            repo = timm.models.get_pretrained_cfg(cfg.dino_backbone).hf_hub_id
        except (AttributeError, RuntimeError):
            repo = None
        if not repo:
            out.append(f"feature backbone (dino_backbone): timm knows no weights named {cfg.dino_backbone!r}")
        elif not cached(repo, "model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            out.append(f"feature backbone (dino_backbone): {repo} is not in the hub cache: `hf download "
                       f"{repo}`, or --dino_weights=/path/to/model.safetensors")
    for used, key in (({"pickscore", "pickscore_adv"}, "pickscore_model"),
                      ({"pickscore", "pickscore_adv"}, "pickscore_processor"),
                      ({"clip_score", "clip_sim", "aesthetic"}, "clip_model")):
        if key == "pickscore_processor" and cfg.pickscore_model.startswith("random:"):
            continue  # a random CLIP brings its own tokenizer
        if names & used and not cached(repo := getattr(cfg, key), "config.json", "tokenizer_config.json"):
            out.append(f"{key}: {repo} is not in the hub cache: `hf download {repo}`, or a local folder")
    url = cfg.aesthetic_weights
    if "aesthetic" in names and url.startswith("http") and not os.path.isfile(
            os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))):
        out.append(f"aesthetic_weights: {os.path.basename(url)} is not in torch's hub cache: download {url} "
                   "and pass --aesthetic_weights=/path/to/it")
    return out


def needs(spec):
    """What the chosen rewards need the run to build: a subset of {"references", "phi"}."""
    named = [ADVERSARIES[n].needs if n in ADVERSARIES else inspect.signature(REWARDS[n]).parameters
             for n in spec]
    return {k for k in ("references", "phi") if any(k in ks for ks in named)}


def build_reward(spec, **ctx):
    """Weighted sum of registered rewards, e.g. build_reward({"dino_sim": 1.0, "brightness": 0.1},
    references=refs, phi=phi). Each factory gets the keys of `ctx` it names, and its settings from the
    spec. info holds each component's batch mean as `reward/<name>` plus its own info as `<name>/<key>`."""
    unknown = [n for n in spec if n not in REWARDS]
    if unknown:
        raise KeyError(f"unknown rewards {unknown}; registered: {sorted(REWARDS)}; {list(ADVERSARIES)} are "
                       "adversaries (build_adversary)")
    weights, fns = {}, {}
    for name, value in spec.items():
        named = inspect.signature(REWARDS[name]).parameters
        weights[name], settings = _split(value)
        fns[name] = REWARDS[name](**{**{k: v for k, v in ctx.items() if k in named}, **settings})

    def fn(images, prompts, metadata):
        total = torch.zeros(len(images), device=images.device)  # (B,)
        info = {}
        for name, f in fns.items():
            r, sub = f(images, prompts, metadata)
            total = total + weights[name] * r.float()
            info[f"reward/{name}"] = r.float().mean().item()
            info.update({f"{name}/{k}": v for k, v in sub.items()})
        return total, info
    return fn


def build_fixed_reward(cfg, device, references=None, phi=None):
    """The weighted sum of the fixed (not adversarial) rewards in cfg.reward, or None. Their factories may
    name `device`, `references`, `phi` (built from the config when not given) and any config key."""
    fixed = {k: v for k, v in cfg.reward.items() if k not in ADVERSARIES}
    if not fixed:
        return None
    if "phi" in needs(fixed) and phi is None:
        phi = make_features(cfg, device)
    return build_reward(fixed, **{**vars(cfg), "device": device, "references": references, "phi": phi})


def build_adversary(cfg, device, cond_dim=0, phi=None):
    """The adversary named in cfg.reward (at most one), or None. `cond_dim`: the pooled text embedding's
    width, for cfg.d_conditional; `phi`: the DINO features to share (built from the config if needed)."""
    name = next((k for k in cfg.reward if k in ADVERSARIES), None)
    if name is None:
        return None
    if "phi" in ADVERSARIES[name].needs and phi is None:
        phi = make_features(cfg, device)
    adversary = ADVERSARIES[name].from_config(cfg, device, phi, cond_dim)
    adversary.weight = _split(cfg.reward[name])[0]
    return adversary
