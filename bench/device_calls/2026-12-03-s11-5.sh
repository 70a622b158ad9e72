#!/usr/bin/env bash
# Device call 5 of session 11 (2026-12-03): the MoE align kernel (10 us a layer at batch 100, 4 us at batch 1 in
# call 3) over chunk sizes and warps (bench/moe_router.py --align). (A bench/steps.py part was dropped: a refused
# start left too little device time.)
set -uo pipefail
OUT=${OUT:-/tmp/fastlfm-out}; mkdir -p "$OUT"; export OUT
export PYTHONPATH=src PYTHONUNBUFFERED=1
LOG=$OUT/call.log
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$LOG"
timeout 60 python3 bench/moe_router.py --models LFM2-8B-A1B --tokens 1 100 256 --align 2>&1 | grep -vi warn | tail -8 \
    | tee -a "$LOG"
