# The shapes world, second study: distribution (style) transfer.
#   python train.py config/tiny_style.py
# The base model saw mostly light backgrounds (90 %); the references are dark. The adversarial reward (a
# discriminator on the frozen tiny ViT that stands in for DINOv2) should move held-out generations
# to the references' style (eval/background → eval/ref_background) without losing content
# (eval/toy_geneval). See docs/RESULTS.md for what this measured.
# The same world and code as config/tiny.py; what differs:
base = "tiny.py"
pretrained = "assets/tinyworld/pipeline"                # 2,000 steps, 90 % light / 10 % dark renders
references = "assets/tinyworld/refs_dark/index.json"
group_size = 8
prompts_per_epoch = 8
train_batch_size = 16
updates_per_epoch = 2            # two optimizer steps an epoch, 32 images each
lr = 3e-4                        # measured with these: config/tiny.py moved on
d_lr = 1e-4                      # d_warmup 5: the head learns light vs dark before the generator listens
epochs = 60
save_every = 20
eval_every = 10
eval_n_per_prompt = 2
out_dir = "out/tiny_style"
