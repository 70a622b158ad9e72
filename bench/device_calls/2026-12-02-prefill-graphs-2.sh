#!/usr/bin/env bash
# One device call (2026-12-02 session 4): the engine checks on the GPU (prefill graphs), the server
# over HTTP on LFM2-1.2B (bench/serve_stage.sh), the prefix-cache load (cache on with the host trace, off).
set -uo pipefail
OUT=${OUT:-/tmp/fastlfm-out}; mkdir -p "$OUT"; export OUT
export PYTHONPATH=src PYTHONUNBUFFERED=1
timeout 100 python3 bench/check_kernels.py --engine-only 2>&1 | tail -8 | tee "$OUT/kernels_engine.log"
STAGES="serve" SERVE_S=290 SERVE_MODELS=LFM2-1.2B RELIABILITY_MODELS=LFM2-1.2B RELIABILITY_S=100 bash bench/device_run.sh
source bench/server_env.sh
for mode in on off; do
    trace=()
    [ "$mode" = on ] && trace=(env PYTHONPATH="$PYTHONPATH:bench/host_trace" FASTLFM_TRACE="$OUT/trace_on.jsonl")
    timeout 75 "${trace[@]}" python3 bench/prefix_cache.py LFM2-1.2B --server-args=--no-compile --modes $mode \
        --output-dir /tmp/prefix-$mode 2>&1 | tail -6 | tee "$OUT/prefix_$mode.log"
done
python3 bench/host_trace/report.py "$OUT/trace_on.jsonl" --turns 10 > "$OUT/trace_report_on.txt" 2>&1
rm -f "$OUT/trace_on.jsonl"
