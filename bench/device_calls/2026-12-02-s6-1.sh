#!/usr/bin/env bash
# Device call 1 of session 6 (2026-12-02): do llguidance's masks scale over threads when the rows'
# matchers come from independently compiled templates ("lanes")? (issue 18, structured output at
# batch 64); then the server stage on both dense models: concurrency 1 / 16 / 100, the reliability
# test with /health latency under load, the SIGTERM exit (issue 16).
set -uo pipefail
OUT=${OUT:-/tmp/fastlfm-out}; mkdir -p "$OUT"; export OUT
export PYTHONPATH=src PYTHONUNBUFFERED=1
lscpu | grep -E "^(CPU\(s\)|Thread|Core|Socket|Model name)" | tee "$OUT/cpu.txt"
source bench/wheels_env.sh
timeout 120 python3 bench/grammar_threads.py --rows 64 --steps 48 --threads 2 4 8 16 2>&1 | tee "$OUT/grammar_threads.log"
SERVE_MODELS="LFM2-350M LFM2-1.2B" RELIABILITY_MODELS=LFM2-1.2B RELIABILITY_S=110 timeout 440 bash bench/serve_stage.sh \
    2>&1 | tee "$OUT/serve.log"
