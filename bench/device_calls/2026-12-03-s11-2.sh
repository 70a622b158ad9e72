#!/usr/bin/env bash
# Device call 2 of session 11 (2026-12-03). Call 1 (d2c255b) found the first router kernel (tl.dot in IEEE
# fp32, 16 tokens a program) slower than the torch ops it replaced (batch-1 decode 621 -> 327 tok/s).
# 1. the router kernel checks; 2. bench/moe_router.py: the per-token kernel vs the torch ops (eager and
# compiled) at 1-1024 tokens; 3. bench/gpu.py --models LFM2-8B-A1B again.
set -uo pipefail
OUT=${OUT:-/tmp/fastlfm-out}; mkdir -p "$OUT"; export OUT
export PYTHONPATH=src PYTHONUNBUFFERED=1
LOG=$OUT/call.log
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$LOG"
echo "##### 1. router kernel checks" | tee -a "$LOG"
timeout 60 python3 bench/check_kernels.py --only "moe router" 2>&1 | grep -vi warn | tee -a "$LOG"
echo "##### 2. bench/moe_router.py" | tee -a "$LOG"
timeout 120 python3 bench/moe_router.py 2>&1 | grep -vi warn | tail -12 | tee -a "$LOG"
echo "##### 3. bench/gpu.py LFM2-8B-A1B" | tee -a "$LOG"
timeout 400 python3 bench/gpu.py --models LFM2-8B-A1B --table moe_table.md --no-moe-kernel-ab 2>&1 | grep -v "^$" \
    | grep -vi warn | tail -24 | tee -a "$LOG"
