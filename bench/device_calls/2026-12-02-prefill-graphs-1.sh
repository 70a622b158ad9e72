#!/usr/bin/env bash
# One device call (2026-12-02 session 4): kernel checks, LFM2-350M engine + user paths (prefill graphs),
# then the prefix-cache load with the host trace, cache on and off.
set -uo pipefail
OUT=${OUT:-/tmp/fastlfm-out}; mkdir -p "$OUT"; export OUT
STAGES="kernels gpu" KERNELS_S=130 GPU_S=290 bash bench/device_run.sh --models LFM2-350M --hf-b1-tokens 64 --hf-thr-tokens 16
source bench/server_env.sh
export PYTHONPATH=$PYTHONPATH:bench/host_trace
for mode in on off; do
    FASTLFM_TRACE=$OUT/trace_$mode.jsonl timeout 95 python3 bench/prefix_cache.py LFM2-1.2B --server-args=--no-compile \
        --modes $mode --output-dir /tmp/prefix-$mode 2>&1 | tail -25 | tee "$OUT/prefix_$mode.log"
    python3 bench/host_trace/report.py "$OUT/trace_$mode.jsonl" --turns 10 > "$OUT/trace_report_$mode.txt" 2>&1
    cp /tmp/prefix-$mode/prefix_cache.md "$OUT/prefix_cache_$mode.md" 2>/dev/null
done
