#!/usr/bin/env bash
# Device call 3 of session 5 (2026-12-02): the server with its engine in a process of its own
# (`fastlfm serve` default now): LFM2-1.2B at concurrency 1 / 16 / 100, the reliability test at full
# scale, the SIGTERM exit (issue 16); then the prefix-cache load, cache on and off (issue 18).
set -uo pipefail
OUT=${OUT:-/tmp/fastlfm-out}; mkdir -p "$OUT"; export OUT
export PYTHONPATH=src PYTHONUNBUFFERED=1
SERVE_MODELS=LFM2-1.2B RELIABILITY_MODELS=LFM2-1.2B RELIABILITY_S=110 timeout 330 bash bench/serve_stage.sh \
    2>&1 | tee "$OUT/serve.log"
source bench/server_env.sh
for mode in on off; do
    timeout 90 python3 bench/prefix_cache.py LFM2-1.2B --server-args=--no-compile --modes $mode \
        --output-dir /tmp/prefix-$mode 2>&1 | tail -4 | tee "$OUT/prefix_$mode.log"
done
