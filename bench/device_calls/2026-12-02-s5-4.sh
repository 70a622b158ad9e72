#!/usr/bin/env bash
# Device call 4 of session 5 (2026-12-02), cut to the device time left: whether llguidance's masks scale
# over threads on this 16-core host (bench/grammar_threads.py, issue 18); the reliability test at full
# scale on LFM2-1.2B with /health probed and the SIGTERM exit (issue 16), with the engine process, the
# message-count refusal and the fast engine-process exit; the server --no-compile (CUDA graphs of the
# eager step) so that it starts in seconds.
set -uo pipefail
OUT=${OUT:-/tmp/fastlfm-out}; mkdir -p "$OUT"; export OUT
export PYTHONPATH=src PYTHONUNBUFFERED=1
(source bench/wheels_env.sh && timeout 55 python3 bench/grammar_threads.py --rows 64 --steps 48 --threads 4 8 16 \
    --schemas records) 2>&1 | tail -5 | tee "$OUT/grammar_threads.log"
SERVE_MODELS=LFM2-1.2B RELIABILITY_MODELS=LFM2-1.2B RELIABILITY_S=80 SERVE_FLAGS="--no-compile" \
    BENCH_FLAGS="--concurrency 1 --num-prompts 2" timeout 120 bash bench/serve_stage.sh 2>&1 | tee "$OUT/serve.log"
