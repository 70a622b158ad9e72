#!/usr/bin/env bash
# Device call 3 of session 11 (2026-12-03). Call 2: LFM2-8B-A1B batch-1 decode 556 tok/s (1.80 ms a step) against
# 621 (1.61 ms) on 2026-12-02 at 67b1168, although the router kernel saves ~0.15 ms a step: where does a batch-1
# step's time go now? bench/steps.py: decode steps at batch 1 and 100, GPU time by kernel.
set -uo pipefail
OUT=${OUT:-/tmp/fastlfm-out}; mkdir -p "$OUT"; export OUT
export PYTHONPATH=src PYTHONUNBUFFERED=1
LOG=$OUT/call.log
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$LOG"
source bench/wheels_env.sh || exit 1  # steps.py imports fastlfm.server (uvicorn)
timeout 300 python3 bench/steps.py --model LFM2-8B-A1B --no-profile --decode-batch 1 100 2>&1 | grep -v "^$" \
    | grep -vi warn | tail -70 | tee -a "$LOG"
