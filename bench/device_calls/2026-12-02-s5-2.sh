#!/usr/bin/env bash
# Device call 2 of session 5 (2026-12-02): after the decode kernel stopped specialising on the block
# table's width (a Triton JIT compile mid-serving): the prefix-cache load with the host trace, cache on
# and off (issue 18); the grammar masks alone per pool size (issue 18); the server at concurrency 1 / 16 /
# 100 with the host trace, the reliability test at full scale and the SIGTERM exit (issue 16).
set -uo pipefail
OUT=${OUT:-/tmp/fastlfm-out}; mkdir -p "$OUT"; export OUT
export PYTHONPATH=src PYTHONUNBUFFERED=1
source bench/server_env.sh
for mode in on off; do
    PYTHONPATH=$PYTHONPATH:bench/host_trace FASTLFM_TRACE=$OUT/prefix_trace_$mode.jsonl \
        timeout 85 python3 bench/prefix_cache.py LFM2-1.2B --server-args=--no-compile --modes $mode \
        --output-dir /tmp/prefix-$mode 2>&1 | tail -4 | tee "$OUT/prefix_$mode.log"
    python3 bench/host_trace/report.py "$OUT/prefix_trace_$mode.jsonl" --turns 10 2>&1 | head -40 | tee -a "$OUT/prefix_$mode.log"
done
timeout 100 python3 bench/structured.py --batches 64 --repeats 1 --new-tokens 256 --mask-threads 0 4 8 16 \
    --table structured_masks.md 2>&1 | grep -v "^$" | tail -12 | tee "$OUT/structured_masks.log"
PYTHONPATH=src:bench/host_trace FASTLFM_TRACE=$OUT/serve_trace.jsonl SERVE_MODELS=LFM2-1.2B \
    RELIABILITY_MODELS=LFM2-1.2B RELIABILITY_S=110 timeout 330 bash bench/serve_stage.sh 2>&1 | tee "$OUT/serve.log"
