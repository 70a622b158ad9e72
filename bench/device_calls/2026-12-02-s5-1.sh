#!/usr/bin/env bash
# Device call 1 of session 5 (2026-12-02): the engine's recovery from exceptions on the GPU path
# (issue 14), structured output at batch 64 with llguidance's thread pool (issue 18), and the
# prefix-cache load with the host trace (issue 18).
set -uo pipefail
OUT=${OUT:-/tmp/fastlfm-out}; mkdir -p "$OUT"; export OUT
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
timeout 150 python3 bench/check_kernels.py --engine-only 2>&1 | tail -25 | tee "$OUT/engine_checks.log"
source bench/server_env.sh
timeout 150 python3 bench/structured.py --batches 64 --repeats 1 --grammar-threads 8 --table structured_t8.md \
    2>&1 | tail -12 | tee "$OUT/structured_t8.log"
for mode in on off; do
    PYTHONPATH=$PYTHONPATH:bench/host_trace FASTLFM_TRACE=$OUT/trace_$mode.jsonl \
        timeout 85 python3 bench/prefix_cache.py LFM2-1.2B --server-args=--no-compile --modes $mode \
        --output-dir /tmp/prefix-$mode 2>&1 | tail -6 | tee "$OUT/prefix_$mode.log"
    python3 bench/host_trace/report.py "$OUT/trace_$mode.jsonl" --turns 10 2>&1 | tee "$OUT/trace_$mode.txt"
done
