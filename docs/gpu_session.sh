#!/bin/bash
# The GPU checks behind docs/PERF.md §3, in one go (≈ 7 min on one H100/H200, most of it torch.compile).
# From the repo root on a CUDA machine with requirements.txt installed:   OUT=/tmp/gpu bash docs/gpu_session.sh
# Writes run.log (everything printed), compile.json, low_mem.json, smoke_metrics.jsonl, eval_metrics.json to $OUT.
#   1. bench.py eager then compiled, same process (checkpointing on cards under 120 GB: the plain train step
#      peaks at ~101 GiB, docs/PERF.md §3.2)
#   2. bench.py --low_mem: the 24 GB option set (config/sd35m_24gb.py), peak memory per stage
#   3. the CUDA-only tests: bench.py's memory bookkeeping; the first-recompute ratio (exactly 1) at SD3.5-M size
#   4. train.py with the SD3.5-M DINO preset + the 24 GB preset, random weights, 2 epochs, then sample.py on its
#      checkpoint: the README's commands at full size (prompts and references from assets/, no hub weights)
# Each step has a time limit so that one slow step cannot eat the others'.
set -u
OUT=${OUT:-/tmp/gpu}; mkdir -p "$OUT"; LOG=$OUT/run.log
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
step() { echo "=== $(date -u +%H:%M:%S) $*" | tee -a "$LOG"; }
step gpu
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
python3 -c "import torch, diffusers, transformers, peft, timm; print('torch', torch.__version__, 'diffusers', \
diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'timm', timm.__version__)" 2>&1 | tee -a "$LOG"
MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
GC=""; [ "${MEM:-0}" -lt 120000 ] && GC="--gradient_checkpointing"
# 2 prompts × 16 = 32 images per epoch: the recipe's per-GPU batches (16 sampled, 8 trained) and a third of
# its per-GPU epoch (96 images); per-image figures are those of the full epoch.
B="--prompts_per_epoch=2 --epochs=1"
if [ -z "${SMOKE_ONLY:-}" ]; then   # SMOKE_ONLY=1: step 4 alone
step "bench eager + compiled $GC"
timeout 390 python3 bench.py $B $GC --eager_baseline --out="$OUT/compile.json" 2>&1 | tee -a "$LOG"
step "bench low_mem"
timeout 150 python3 bench.py $B --low_mem --out="$OUT/low_mem.json" 2>&1 | tee -a "$LOG"
step "pytest cuda"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_bench.py -k cuda 2>&1 | tail -3 | tee -a "$LOG"
fi
if [ -z "${SKIP_RATIO:-}" ]; then   # ~5 min, most of it compiling SD3.5-M twice (sampling and training graphs)
step "first-recompute ratio at SD3.5-M size, bf16, grad on, eager and compiled"
timeout 420 python3 -m pytest -q -s -p no:cacheprovider tests/test_train.py -k cuda_bf16 2>&1 | grep "compile=\|passed\|failed" | tee -a "$LOG"
fi
step "train.py sd35m_dino + sd35m_24gb, random weights"
timeout 180 python3 -m torch.distributed.run --standalone --nproc_per_node=1 train.py config/sd35m_dino.py \
    config/sd35m_24gb.py --pretrained=random:sd3.5-medium --dino_backbone=random:vit_base_patch14_dinov2 \
    --references=assets/tiny_refs --train_prompts=assets/tiny_prompts.txt --test_prompts=assets/tiny_prompts.txt \
    --prompts_per_epoch=2 --epochs=2 --schedule=shared --eval_every=1 --eval_max_prompts=2 --save_every=2 \
    --out_dir=/tmp/smoke 2>&1 | grep -v '^ \|^{\|^}' | tee -a "$LOG"
cp /tmp/smoke/metrics.jsonl "$OUT/smoke_metrics.jsonl" 2>/dev/null
step "sample.py on the checkpoint"
timeout 120 python3 sample.py --ckpt /tmp/smoke/checkpoints/epoch_000001 --prompt "a red circle on the left" \
    --n_per_prompt 2 --out /tmp/smoke/eval 2>&1 | tail -4 | tee -a "$LOG"
cp /tmp/smoke/eval/metrics.json "$OUT/eval_metrics.json" 2>/dev/null
step done
