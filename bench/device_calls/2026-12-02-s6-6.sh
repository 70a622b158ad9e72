#!/usr/bin/env bash
# Device call 6 of session 6 (2026-12-02): the server's exit after SIGTERM with torch.compile's workers
# stopped by the engine process (issue 16): exit time, and whether the resource tracker still warns of
# leaked semaphores. LFM2-350M, a few short requests.
set -uo pipefail
OUT=${OUT:-/tmp/fastlfm-out}; mkdir -p "$OUT"; export OUT
export PYTHONPATH=src PYTHONUNBUFFERED=1
SERVE_MODELS=LFM2-350M RELIABILITY_MODELS=none BENCH_FLAGS="--concurrency 1 --num-prompts 4 --output-len 32" \
    timeout 200 bash bench/serve_stage.sh 2>&1 | grep -v "^$" | tail -12 | tee "$OUT/exit.log"
