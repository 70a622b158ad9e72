#!/usr/bin/env bash
# Device call 2 of session 6 (2026-12-02): structured output at batch 1 and 64 after grammar lanes,
# finer token slices and masks filled beside the processing of the step in flight (issue 18):
# the default pool (half the CPUs), then 16 threads at batch 64.
set -uo pipefail
OUT=${OUT:-/tmp/fastlfm-out}; mkdir -p "$OUT"; export OUT
export PYTHONPATH=src PYTHONUNBUFFERED=1
source bench/wheels_env.sh
timeout 250 python3 bench/structured.py --mask-threads 0 8 16 --table "$OUT/structured.md" 2>&1 | grep -v "^$" | tail -24 \
    | tee "$OUT/structured.log"
timeout 150 python3 bench/structured.py --batches 64 --grammar-threads 16 --table "$OUT/structured_t16.md" 2>&1 \
    | grep -v "^$" | tail -12 | tee "$OUT/structured_t16.log"
