# The paper's adversarial DINOv2 reward with DiffusionNFT as the generator's optimizer (objective = "nft",
# nft.py) instead of GRPO: beyond every published Adv-GRPO codebase. 8 GPUs:
#   torchrun --nproc_per_node=8 train.py config/sd35m_dino_nft.py
# Everything of config/sd35m_dino.py (model, references, discriminator and its schedule, batch) is kept, so
# the two runs differ in the optimizer alone; the NFT keys are DiffusionNFT's published SD3.5-M recipe.
base = "sd35m_dino.py"
objective = "nft"
num_steps = 10                 # sampling steps, all ODE (published: 10, with a 2nd-order solver)
nft_guidance_scale = 1.0       # DiffusionNFT samples and trains CFG-free (guidance_scale is GRPO's)
nft_beta = 1.0
nft_eta_max = 0.5              # θ_old ← η·θ_old + (1-η)·θ, η = min(0.001 · steps, 0.5)
nft_eta_rate = 0.001
nft_t_fraction = 0.99          # 9 of the 10 sampler times per image
nft_adaptive = True
beta_kl = 1e-4                 # published: 1e-4 · mean‖v_θ - v_ref‖² to the frozen base (a third forward)
updates_per_epoch = 1          # published: one optimizer step per epoch (GenEval, PickScore recipes)
ema_every = 1                  # published: the EMA (decay 0.9) after every optimizer step
eval_guidance_scale = 1.0      # evaluated as it samples (published: CFG-free, 40 steps); compare runs at
                               # one CFG: eval.py re-evaluates a checkpoint at any eval_guidance_scale
out_dir = "out/sd35m_dino_nft"
