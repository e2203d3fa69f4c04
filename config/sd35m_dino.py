# The paper's main setting (its published recipe): SD3.5-Medium, 512², adversarial DINOv2 reward.
# 8 GPUs: torchrun --nproc_per_node=8 train.py config/sd35m_dino.py
# train.py's defaults *are* this recipe (48 prompts × 16 images an epoch, CPS a = 0.8 on steps 0-1 of 10,
# CFG 4.5, LoRA r32/α64 on the joint attention, lr 3e-4, ε = 1e-5, references data/refs/index.json, D every
# epoch but each 10th: `python train.py --help` lists them). A preset states only what differs; here:
compile = True                 # torch.compile: ×1.94 per epoch on one H200, ~4 min of compiling at start
                               # (docs/PERF.md); off in the defaults, so CPUs and tests skip compiling
# Left at the paper's constant lr: `--lr_half_life=N` (the lr halves every N optimizer steps) held the shapes
# world's 60-epoch runs at their best where a constant lr 1e-3 sank, the oracle reward's run included — a
# step-size effect, not one of the shapes world, but measured only there and at 1 G step per 96 images
# (docs/RESULTS.md, "Twice the demo's budget"). At scale, watch the log: `signal` (d_signal) near 0 means the
# discriminator's reward has become noise; a drift warning with `signal` high means the generator is leaving
# the references on a reward that still ranks consistently — the case a decaying lr addressed there.
