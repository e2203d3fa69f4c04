#!/bin/bash
# Everything that needs a GPU since the last GPU run (2026-11-26), in one call of under 10 minutes on one
# H100/H200 — what docs/PERF.md §3 is waiting for. From the repo root on a CUDA machine:
#   OUT=/tmp/gpu bash docs/gpu_session.sh
# Before, on a machine with network (the GPU machine has none), next to the checkout:
#   .whl/        wheels of what the GPU machine lacks (diffusers, peft, timm, ...; installed to /tmp/site)
#   .published/  a copy of github.com/showlab/Adv-GRPO (its adv_grpo/ folder is enough), for step 1
# (both ignored by git: `echo /.whl/ /.published/ >> .git/info/exclude`). Writes run.log (everything printed)
# and the JSON of each step to $OUT. Each step has its own time limit, so one slow step cannot eat the rest;
# the limits add up to 560 s.
#   1. the published code and ours side by side: sampling with log-probs and one G update (bench/)
#   2. a sampling profile (eager): where the ~70 ms a forward outside dense maths goes (torch.profiler)
#   3. bench.py --low_mem --compile: the compiled 24 GB set (never measured: compile with checkpointing)
#   4. the CUDA-only tests: bench's memory bookkeeping; the first-recompute ratio exactly 1 (eager, bf16)
#   5. one epoch each of DiffusionNFT and of the PickScore adversary at SD3.5-M shapes (random weights)
set -u
OUT=${OUT:-/tmp/gpu}; mkdir -p "$OUT"; LOG=$OUT/run.log
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
step() { echo "=== $(date -u +%H:%M:%S) $*" | tee -a "$LOG"; }
step gpu
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
python3 -c "import torch, diffusers, transformers, peft, timm; print('torch', torch.__version__, 'diffusers', \
diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'timm', timm.__version__)" 2>&1 | tee -a "$LOG"
MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
GC=""; [ "${MEM:-0}" -lt 120000 ] && GC="--gradient_checkpointing=True"   # the plain G step peaks at ~101 GiB
B="--prompts_per_epoch=2 --epochs=1"   # 32 images: the recipe's per-GPU batches, a third of its per-GPU epoch
# random SD3.5-M, DINOv2-B/14, the tiny world's prompts and references: no hub weights needed
RANDOM="--pretrained=random:sd3.5-medium --dino_backbone=random:vit_base_patch14_dinov2 --t5=False \
  --references=assets/tiny_refs --train_prompts=assets/tiny_prompts.txt --eval_every=0 --epochs=1 \
  --prompts_per_epoch=2 --save_every=1"

step "1. side by side with the published code"
if [ -d .published/adv_grpo ]; then
  timeout 120 python3 bench/official_side_by_side.py --published=.published --iters=2 $GC \
    --out="$OUT/side.json" 2>&1 | tee -a "$LOG"
else echo "no .published/adv_grpo: skipped" | tee -a "$LOG"; fi

step "2. sampling profile, eager"
timeout 60 python3 - <<'EOF' 2>&1 | tee -a "$LOG"
import torch, configurator, model as M, train as T
cfg = configurator.parse_args(["--pretrained=random:sd3.5-medium", "--t5=False", "--compile=False"])
gen = M.build_generator(cfg, torch.device("cuda"))
prompts = ["a red circle on the left"] * 16
T.sample_epoch(cfg, 0, gen, prompts, range(16), 0, progress=False)          # warm-up
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                        torch.profiler.ProfilerActivity.CUDA]) as prof:
    T.sample_epoch(cfg, 1, gen, prompts, range(16), 0, progress=False)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
prof.export_chrome_trace("/tmp/sampling_trace.json")
EOF
gzip -c /tmp/sampling_trace.json > "$OUT/sampling_trace.json.gz" 2>/dev/null

step "3. bench --low_mem --compile (the compiled 24 GB set)"
timeout 240 python3 bench.py $B --low_mem --compile=True --out="$OUT/low_mem_compiled.json" 2>&1 | tee -a "$LOG"

step "4. CUDA-only tests (eager ratio at SD3.5-M size)"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_bench.py -k cuda 2>&1 | tail -3 | tee -a "$LOG"
timeout 60 python3 -m pytest -q -s -p no:cacheprovider tests/test_train.py -k "cuda_bf16 and False" 2>&1 \
  | grep "compile=\|passed\|failed" | tee -a "$LOG"

step "5a. DiffusionNFT epoch at SD3.5-M shapes"
timeout 70 python3 train.py config/sd35m_dino_nft.py $RANDOM $GC --compile=False --d_warmup=0 --schedule=shared \
  --out_dir=/tmp/nft --overwrite=True 2>&1 | grep -v '^ \|^{\|^}' | tee -a "$LOG"
cp /tmp/nft/metrics.jsonl "$OUT/nft_metrics.jsonl" 2>/dev/null
step "5b. PickScore adversary epoch at SD3.5-M shapes (random CLIP-H)"
timeout 70 python3 train.py config/sd35m_pickscore.py $RANDOM $GC --compile=False \
  --pickscore_model=random:vit-h-14 --out_dir=/tmp/pick --overwrite=True 2>&1 | grep -v '^ \|^{\|^}' | tee -a "$LOG"
cp /tmp/pick/metrics.jsonl "$OUT/pick_metrics.jsonl" 2>/dev/null
step done
