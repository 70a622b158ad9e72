#!/usr/bin/env bash
# Device call 3 of session 8 (2026-12-03), issue 16: the server (LFM2-1.2B, c=1 and c=100) after the
# host-work changes (held outputs merged once, the scheduler's fast path for decode rows, positional
# RequestOutput), then the same server with OMP_NUM_THREADS=1 (the engine process's torch threads on
# the host: does the CPU side of a CUDA step contend with the server and the client?), then
# bench/loop_overhead.py with a full warm-up run first. Call 2 measured commit 0e6543f on the same
# kind of machine: c=100 29.4k out tok/s, TTFT c=1 18.8 ms.
set -uo pipefail
OUT=${OUT:-/tmp/fastlfm-out}; mkdir -p "$OUT"; export OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=src
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
for side in new omp1; do
    echo "##### $side"
    extra=(); [[ $side == omp1 ]] && extra=(env OMP_NUM_THREADS=1)
    ${extra[@]+"${extra[@]}"} env SERVE_MODELS="LFM2-1.2B" RELIABILITY_MODELS="none" BENCH_FLAGS="--concurrency 1 100" \
        timeout 200 bash bench/serve_stage.sh 2>&1 | grep -v "^$" | grep -E "concurrency|^\| |server up|Goals" | tee "$OUT/serve-$side.log"
done
source bench/server_env.sh
timeout 200 python3 bench/loop_overhead.py --model LFM2-1.2B --num 100 --checkpoint-dir /tmp --warmup-full 2>&1 | grep -v "^$" | tail -40 | tee "$OUT/loop_overhead.log"
