# The shapes world (tinyworld.py): Adv-GRPO on a laptop CPU through the same code path as SD3.5.
#   python train.py config/tiny.py          (= make demo)
# The base model saw mostly light backgrounds (90 %); the references are dark. The adversarial reward (a
# discriminator on the frozen tiny ViT that stands in for DINOv2) should move held-out generations
# to the references' style (eval/background → eval/ref_background) without losing content
# (eval/toy_geneval). See README "Results" for what this measured.
pretrained = "assets/tinyworld/pipeline"
t5 = False
# max_sequence_length (1: one zero token in T5's slot) comes from the pipeline folder's sample_settings.json
resolution = 32
mixed_precision = "no"
train_prompts = "assets/tinyworld/train.txt"
test_prompts = "assets/tinyworld/test.txt"
references = "assets/tinyworld/refs_dark/index.json"
dino_backbone = "vit_small_patch14_dinov2"   # the tiny DINOv2-style ViT of assets/tinyworld/build.py
dino_weights = "assets/tinyworld/backbone.safetensors"
dino_kwargs = dict(patch_size=4, embed_dim=64, depth=4, num_heads=4, init_values=1.0)
dino_image_size = 32
num_steps = 10
guidance_scale = 3.0
sde_kind = "cps"
noise_level = 0.8
window_start = "0"
window_size = 2
group_size = 8
prompts_per_epoch = 8
sample_batch_size = 32
train_batch_size = 16
updates_per_epoch = 2
lora_rank = 8
lora_alpha = 16
lr = 3e-4
clip_range = 1e-3
reward = {"dino_adv": 1.0}
schedule = "shared"
d_steps = 1
d_warmup = 5                     # the head learns light vs dark before the generator listens to it
d_lr = 1e-4
ema_every = 1
ema_decay = 0.9
epochs = 60
save_every = 20
eval_every = 10
eval_num_steps = 10
eval_guidance_scale = 3.0
eval_n_per_prompt = 2
eval_max_prompts = 0
out_dir = "out/tiny"
