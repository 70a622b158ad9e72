#!/usr/bin/env bash
# Device call 1 of session 7 (2026-12-03): the server at concurrency 100 with 1,000 prompts of
# 1k in / 1k out (issue 16). bench_serving's default is 1,000 prompts; session 6 measured 200 (two
# waves, whose ramp-up and tail are ~20% of the run) and got 33.6k out tok/s on LFM2-1.2B.
set -uo pipefail
OUT=${OUT:-/tmp/fastlfm-out}; mkdir -p "$OUT"; export OUT
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
SERVE_MODELS="LFM2-1.2B" RELIABILITY_MODELS="" BENCH_FLAGS="--concurrency 100 --num-prompts 1000" \
    timeout 540 bash bench/serve_stage.sh 2>&1 | tee "$OUT/serve.log"
