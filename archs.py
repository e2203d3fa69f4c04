"""
archs.py — what the models are, as plain data (no torch: `python train.py --help` stays instant): the SD3
architectures that random-weight pipelines are built from, the settings a pipeline folder of this project
carries, the image sizes a transformer allows, the feature backbone's patch size, and which weights a run
cannot find before anything loads (the hub cache looked up without downloading).

Leaves out: building the models (model.py, reward.py).
"""
import json
import os
import re

# -----------------------------------------------------------------------------------------------
# Named architectures for random-weight pipelines. "sd3.5-medium" copies the component configs of
# stabilityai/stable-diffusion-3.5-medium (2.5 B transformer, CLIP-L, CLIP-G, T5-XXL, 16-ch VAE);
# "tiny" keeps the same structure at toy width so a full pipeline builds in well under a second.

ARCHS = {
    "sd3.5-medium": dict(
        transformer=dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                         attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                         caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                         dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
        vae=dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 layers_per_block=2, scaling_factor=1.5305, shift_factor=0.0609,
                 use_quant_conv=False, use_post_quant_conv=False, sample_size=1024),
        clip_l=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    projection_dim=768, hidden_act="quick_gelu", vocab_size=49408),
        clip_g=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                    projection_dim=1280, hidden_act="gelu", vocab_size=49408),
        t5=dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
                feed_forward_proj="gated-gelu", is_gated_act=True, dense_act_fn="gelu_new"),
        clip_max_length=77, shift=3.0, billions=(3.15, 4.76),  # parameters without T5, T5's (said at build)
    ),
    "tiny": dict(
        transformer=dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                         caption_projection_dim=16, pooled_projection_dim=64, pos_embed_max_size=32),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                 layers_per_block=1, norm_num_groups=4, scaling_factor=1.5305, shift_factor=0.0609,
                 use_quant_conv=False, use_post_quant_conv=False, sample_size=32),
        clip_l=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                    projection_dim=32, hidden_act="quick_gelu", vocab_size=1000),
        clip_g=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                    projection_dim=32, hidden_act="gelu", vocab_size=1000),
        t5=dict(d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2, vocab_size=1000,
                feed_forward_proj="gated-gelu", is_gated_act=True, dense_act_fn="gelu_new"),
        clip_max_length=77, shift=3.0,
    ),
}

SETTINGS_FILE = "sample_settings.json"  # beside model_index.json in pipeline folders this project writes


def pipeline_settings(name_or_path):
    """What a pipeline folder needs to be sampled correctly and diffusers cannot know: {} or e.g.
    {"max_sequence_length": 1, "resolution": 32} from `<folder>/sample_settings.json`. The tiny world's
    pipeline was trained with a 1-token text sequence (T5's slot, zeros); sampled with diffusers' default
    of 256 zero tokens its images are blank backgrounds and smudges."""
    path = os.path.join(name_or_path, SETTINGS_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


MAX_SD3_RESOLUTION = 384 * 16  # the widest SD3 position embedding (SD3.5-M: 384 patches of 16 px)


def resolution_limits(name):
    """(multiple, largest): image sizes must be a multiple of VAE factor × patch size, and within what the
    transformer's position embedding covers; read from the configs alone (no weights) of "random:<arch>",
    a local pipeline folder or the hub cache; (None, MAX_SD3_RESOLUTION) when none is at hand."""
    if name.startswith("random:"):
        a = ARCHS.get(name[7:])
        vae, tr = (a["vae"], a["transformer"]) if a else (None, None)
    else:
        try:
            vae, tr = (json.load(open(os.path.join(name, p, "config.json") if os.path.isdir(name) else
                                      hub_file(name, f"{p}/config.json"))) for p in ("vae", "transformer"))
        except (OSError, ValueError, TypeError):
            vae = tr = None
    if not vae:
        return None, MAX_SD3_RESOLUTION
    f = 2 ** (len(vae["block_out_channels"]) - 1) * tr["patch_size"]
    return f, f * tr.get("pos_embed_max_size", MAX_SD3_RESOLUTION // f)


def hub_file(repo, filename):
    """The local path of a hub repository's file if the hub cache holds it, else None."""
    import huggingface_hub
    try:
        path = huggingface_hub.try_to_load_from_cache(repo, filename)
    except ValueError:  # not a valid repository id
        return None
    return path if isinstance(path, str) else None


def backbone_patch(cfg):
    """The patch size of the DINO feature backbone (its images are cut into patches of that many pixels)."""
    if cfg.dino_backbone == "random:tiny":
        return 7
    m = re.search(r"patch(\d+)", cfg.dino_backbone)
    return int(cfg.dino_kwargs.get("patch_size", m.group(1) if m else 1))


def hub_offline():
    """HF_HUB_OFFLINE as huggingface_hub reads it: set and not one of "", 0, false, no, off."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no", "off")


def missing_weights(cfg):
    """The model weights this run cannot find, said before anything loads: a local folder or file that does
    not exist, or (HF_HUB_OFFLINE=1) a hub id that the hub cache does not hold. Lines ([]: none missing)."""
    out = []
    name = cfg.pretrained
    offline = hub_offline()
    if not name.startswith("random:") and not os.path.isdir(name):
        if name.startswith((".", "/", "~")) or name.count("/") != 1:
            out.append(f"model weights (pretrained): no folder {name}")
        elif offline and hub_file(name, "model_index.json") is None:
            out.append(f"model weights (pretrained): {name} is not in the hub cache and HF_HUB_OFFLINE=1: "
                       f"`hf auth login`, accept its licence on the hub, `hf download {name}`, or pass "
                       "--pretrained=/path/to/folder")
    if cfg.t5 and os.path.isfile(os.path.join(name, "model_index.json")) and not os.path.isdir(
            os.path.join(name, "text_encoder_3")):
        out.append(f"T5 (t5=True): {name} was saved without one (no text_encoder_3/): pass --t5=False")
    if cfg.dino_weights and not os.path.isfile(cfg.dino_weights):
        out.append(f"feature backbone weights (dino_weights): no file {cfg.dino_weights}")
    return out


def check(cfg):
    """One line saying why the architectures cannot take cfg (an unknown random one, a resolution the VAE,
    patches or position embedding cannot take, a feature image size that is no multiple of the backbone's
    patch), or None."""
    if cfg.pretrained.startswith("random:") and cfg.pretrained[7:] not in ARCHS:
        return (f"pretrained: unknown random architecture {cfg.pretrained[7:]!r}; known: "
                f"random:{', random:'.join(ARCHS)}")
    f, top = resolution_limits(cfg.pretrained)
    if f and cfg.resolution % f:
        return (f"resolution {cfg.resolution} must be a multiple of {f} "
                f"(VAE factor × patch size of {cfg.pretrained})")
    if cfg.resolution > top:
        return (f"resolution {cfg.resolution} is more than the position embedding of {cfg.pretrained} covers "
                f"(at most {top} px)")
    p = backbone_patch(cfg)
    if cfg.dino_image_size < p or cfg.dino_image_size % p:
        return (f"dino_image_size {cfg.dino_image_size} must be a multiple of the feature backbone's patch "
                f"size ({p} for {cfg.dino_backbone})")
    return None
