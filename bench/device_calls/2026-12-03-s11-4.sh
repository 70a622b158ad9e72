#!/usr/bin/env bash
# Device call 4 of session 11 (2026-12-03). Call 3: inside LFM2-8B-A1B's decode steps the per-token router kernel
# took 22 us a layer (0.49 ms of a 1.75 ms batch-1 step): its K loop of 16 small tiles waited on each load.
# Now a few wide tiles. 1. router checks; 2. bench/moe_router.py with L2 flushed, other tiles too; 3. bench/gpu.py
# on LFM2-8B-A1B and LFM2-24B-A2B (the table).
set -uo pipefail
OUT=${OUT:-/tmp/fastlfm-out}; mkdir -p "$OUT"; export OUT
export PYTHONPATH=src PYTHONUNBUFFERED=1
LOG=$OUT/call.log
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$LOG"
echo "##### 1. router kernel checks" | tee -a "$LOG"
timeout 60 python3 bench/check_kernels.py --only "moe router" 2>&1 | grep -vi warn | tee -a "$LOG"
echo "##### 2. bench/moe_router.py --configs" | tee -a "$LOG"
timeout 100 python3 bench/moe_router.py --configs 2>&1 | grep -vi warn | tail -14 | tee -a "$LOG"
echo "##### 3. bench/gpu.py LFM2-8B-A1B LFM2-24B-A2B" | tee -a "$LOG"
timeout 420 python3 bench/gpu.py --models LFM2-8B-A1B LFM2-24B-A2B --table moe_table.md --no-moe-kernel-ab 2>&1 \
    | grep -v "^$" | grep -vi warn | grep -v causal_conv1d | tail -40 | tee -a "$LOG"
