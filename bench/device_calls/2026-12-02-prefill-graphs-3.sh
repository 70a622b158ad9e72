#!/usr/bin/env bash
# One device call (2026-12-02 session 4): the server over HTTP on LFM2-1.2B after the prefill-kernel
# specialisation fix, prefill graphs captured at start and the stream event budget; then the
# prefix-cache load, cache on and off.
set -uo pipefail
OUT=${OUT:-/tmp/fastlfm-out}; mkdir -p "$OUT"; export OUT
export PYTHONPATH=src PYTHONUNBUFFERED=1
STAGES="serve" SERVE_S=240 SERVE_MODELS=LFM2-1.2B RELIABILITY_MODELS="" bash bench/device_run.sh
source bench/server_env.sh
for mode in on off; do
    timeout 85 python3 bench/prefix_cache.py LFM2-1.2B --server-args=--no-compile --modes $mode \
        --output-dir /tmp/prefix-$mode 2>&1 | tail -6 | tee "$OUT/prefix_$mode.log"
done
