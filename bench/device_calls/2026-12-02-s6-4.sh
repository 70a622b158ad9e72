#!/usr/bin/env bash
# Device call 4 of session 6 (2026-12-02): structured output at batch 64 (issue 18) with the pool or the
# loop chosen by their measured times (structured.PoolChoice); pools of 8 (the default) and 16.
set -uo pipefail
OUT=${OUT:-/tmp/fastlfm-out}; mkdir -p "$OUT"; export OUT
export PYTHONPATH=src PYTHONUNBUFFERED=1
source bench/wheels_env.sh
for t in 8 16; do
    timeout 150 python3 bench/structured.py --batches 64 --grammar-threads $t --table "structured_t$t.md" 2>&1 \
        | grep -v "^$" | tail -10 | tee "$OUT/structured_t$t.log"
done
