#!/usr/bin/env bash
# Device call 3 of session 6 (2026-12-02): structured output at batch 64 (issue 18) after the mask
# thread waits for the fill to begin; where the host time of a step goes, per schema; pools of 4 and 8.
set -uo pipefail
OUT=${OUT:-/tmp/fastlfm-out}; mkdir -p "$OUT"; export OUT
export PYTHONPATH=src PYTHONUNBUFFERED=1
source bench/wheels_env.sh
for t in 8 4; do
    timeout 150 python3 bench/structured.py --batches 64 --grammar-threads $t --table "structured_t$t.md" 2>&1 \
        | grep -v "^$" | tail -10 | tee "$OUT/structured_t$t.log"
done
