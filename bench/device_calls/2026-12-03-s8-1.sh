#!/usr/bin/env bash
# Device call 1 of session 8 (2026-12-03), issue 16: where the server's c=100 throughput goes.
# 1. bench/loop_overhead.py: the engine's step loop against EngineLoop + the engine process's sink
#    (merging, wire deltas, pickling, a pipe), LFM2-1.2B, 100 x 1k/1k, plus a profile of the loop.
# 2. The server over HTTP (bench/serve_stage.sh): LFM2-1.2B at concurrency 1 and 100, after the
#    change that merges held outputs once per delivery instead of once per step.
set -uo pipefail
OUT=${OUT:-/tmp/fastlfm-out}; mkdir -p "$OUT"; export OUT
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
git log --oneline -1 2>/dev/null | tee "$OUT/commit.txt"
timeout 240 python3 bench/loop_overhead.py --model LFM2-1.2B --num 100 2>&1 | grep -v "^$" | tail -45 | tee "$OUT/loop_overhead.log"
SERVE_MODELS="LFM2-1.2B" RELIABILITY_MODELS="" BENCH_FLAGS="--concurrency 1 100" \
    timeout 330 bash bench/serve_stage.sh 2>&1 | tee "$OUT/serve.log"
