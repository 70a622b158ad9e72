#!/usr/bin/env bash
# Device call 2 of session 9 (2026-12-03), issue 16: bench/steps.py on commit ced146c's src (bench/ab_base/src,
# as in call 1) and on the new one: prefill tok/s (32 x 1k) beside transformers' forward, one 1k prompt to
# its first token, GPU time by kernel of a 16 x 1k prefill, and decode steps at batch 100 (wall and by kernel).
set -uo pipefail
OUT=${OUT:-/tmp/fastlfm-out}; mkdir -p "$OUT"; export OUT
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
for side in base new; do
    src=src; [[ $side == base ]] && src=bench/ab_base/src
    PYTHONPATH=$src timeout 270 python3 bench/steps.py --label $side --decode-batch 100 2>&1 | grep -v "^$" \
        | grep -vi "warn" | tail -45 | tee "$OUT/steps-$side.log"
done
