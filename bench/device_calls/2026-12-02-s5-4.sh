#!/usr/bin/env bash
# Device call 4 of session 5 (2026-12-02): the server (engine process, message-count refusal, fast
# engine-process exit) on LFM2-350M and LFM2-1.2B at concurrency 1 / 16 / 100, the reliability test at
# full scale on LFM2-1.2B with /health probed, the SIGTERM exit (issue 16); before it, whether llguidance's
# masks scale over threads on this 16-core host (bench/grammar_threads.py, issue 18).
set -uo pipefail
OUT=${OUT:-/tmp/fastlfm-out}; mkdir -p "$OUT"; export OUT
export PYTHONPATH=src PYTHONUNBUFFERED=1
(source bench/wheels_env.sh && timeout 80 python3 bench/grammar_threads.py --rows 64 --steps 64 --threads 4 8 16) \
    2>&1 | tail -8 | tee "$OUT/grammar_threads.log"
SERVE_MODELS="LFM2-350M LFM2-1.2B" RELIABILITY_MODELS=LFM2-1.2B RELIABILITY_S=110 timeout 400 bash bench/serve_stage.sh \
    2>&1 | tee "$OUT/serve.log"
