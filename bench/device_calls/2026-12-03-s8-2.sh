#!/usr/bin/env bash
# Device call 2 of session 8 (2026-12-03), issue 16. Call 1 measured the server at c=100 at 27.0k out tok/s
# and TTFT p50 at c=1 20.9 ms, against 34.0k / 15.2 ms in session 7: an A/B on this one machine says
# whether the code or the host changed. bench/ab_base/src is commit 0e6543f's src (untracked, carried by
# the working tree; made with `mkdir -p bench/ab_base && git archive 0e6543f src | tar -x -C bench/ab_base`); each side starts its own server (bench/serve_stage.sh: LFM2-1.2B, c=1 and c=100).
# Then bench/loop_overhead.py (the engine's step loop against EngineLoop + the engine process's sink).
set -uo pipefail
OUT=${OUT:-/tmp/fastlfm-out}; mkdir -p "$OUT"; export OUT
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
lscpu | grep -E "Model name|^CPU\(s\)" | tee -a "$OUT/gpu.txt"
for side in base new; do
    src=src; [[ $side == base ]] && src=bench/ab_base/src
    echo "##### $side ($src)"
    PYTHONPATH=$src SERVE_MODELS="LFM2-1.2B" RELIABILITY_MODELS="none" BENCH_FLAGS="--concurrency 1 100" \
        timeout 240 bash bench/serve_stage.sh 2>&1 | grep -v "^$" | grep -E "concurrency|^\| |server up|Goals" | tee "$OUT/serve-$side.log"
done
export PYTHONPATH=src
source bench/server_env.sh
timeout 200 python3 bench/loop_overhead.py --model LFM2-1.2B --num 100 --checkpoint-dir /tmp 2>&1 | grep -v "^$" | tail -40 | tee "$OUT/loop_overhead.log"
