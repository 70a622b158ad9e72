#!/usr/bin/env bash
# Device call 1 of session 12 (2026-12-03). Session 11: LFM2-8B-A1B 100 x 1k/1k 16.3k out tok/s (goal 20k); the
# router's one-token kernel took ~42 us a layer at 100 tokens (L2 flushed) where other tiles took 18 us. New: a
# tensor-core router kernel (BLOCK_T tokens a program). 1. router checks (both kernels, bf16/fp16/fp32);
# 2. bench/moe_router.py tiles of both kernels at 1-256 tokens; 3. bench/steps.py decode steps at batch 1 and 100
# with the default router and with candidates (--router-config).
set -uo pipefail
OUT=${OUT:-/tmp/fastlfm-out}; mkdir -p "$OUT"; export OUT
export PYTHONPATH=src PYTHONUNBUFFERED=1
LOG=$OUT/call.log
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$LOG"
echo "##### 1. router kernel checks" | tee -a "$LOG"
timeout 90 python3 bench/check_kernels.py --only "moe router" 2>&1 | grep -vi warn | tee -a "$LOG"
echo "##### 2. bench/moe_router.py --configs" | tee -a "$LOG"
timeout 200 python3 bench/moe_router.py --models LFM2-8B-A1B --tokens 1 16 100 256 --configs 1 16 100 256 2>&1 \
    | grep -vi warn | tee -a "$LOG"
source bench/wheels_env.sh || exit 1  # steps.py imports fastlfm.server (uvicorn)
for rc in "" "BLOCK_T=16,BLOCK_K=128,num_warps=4" "BLOCK_K=512,num_warps=4"; do
    echo "##### 3. bench/steps.py LFM2-8B-A1B decode, router config: ${rc:-default}" | tee -a "$LOG"
    timeout 150 python3 bench/steps.py --model LFM2-8B-A1B --no-profile --decode-batch 1 100 \
        ${rc:+--router-config $rc} 2>&1 | grep -v "^$" | grep -vi warn | grep -i "decode at\|GPU time of a decode\|route\|align\|gate_up\|down_kernel" | tee -a "$LOG"
done
