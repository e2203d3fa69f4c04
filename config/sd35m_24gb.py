# The paper's recipe on one 24 GB GPU (RTX 3090/4090, A10, L4): same math, less memory.
# Apply after the recipe:
#   python train.py config/sd35m_dino.py config/sd35m_24gb.py --references=data/refs/index.json
# What it changes (train.Config): every prompt is encoded once at start-up, then the text encoders are freed
# (T5-XXL alone is ~9 GiB in bf16) and the embedding cache lives on the CPU; the VAE decodes 4 images at a
# time; the transformer recomputes its activations in the backward pass (gradient checkpointing: ~1.4× slower
# train step, docs/PERF.md). Peak GPU memory measured by `python bench.py --low_mem`: docs/PERF.md.
# On one GPU the global batch (48 prompts × 16 images) is unchanged, so one epoch takes 8× as long as on
# 8 GPUs.
low_mem = True
gradient_checkpointing = True
compile = False                # not yet measured together with low_mem on a GPU; --compile=True to try
