#!/usr/bin/env bash
# Device call 1 of session 9 (2026-12-03), issue 16. New: a prefill step on CUDA runs its RMSNorms,
# SiLU*mul, gated convs and QK-norm + RoPE as Triton kernels (engine/kernels/rowwise.py, conv.py) and
# adds the residual in the GEMM (addmm); eagerly those were ~40% of a 16k-token step's GPU time. Also the
# first GPU run of the benchmark client that deals requests in proportion to its processes' slots.
# bench/ab_base/src is commit ced146c's src (untracked, carried by the working tree; made with
# `mkdir -p bench/ab_base && git archive ced146c src | tar -x -C bench/ab_base`).
# 1. the kernel checks (new kernels in bf16, the engine on the Triton path with prefill graphs);
# 2. the server, base then new (LFM2-1.2B, c=1 and c=100 with 400 requests; the client is always src's).
set -uo pipefail
OUT=${OUT:-/tmp/fastlfm-out}; mkdir -p "$OUT"; export OUT
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
PYTHONPATH=src timeout 150 python3 bench/check_kernels.py 2>&1 | grep -v "^$" | tail -40 | tee "$OUT/check_kernels.log"
export PYTHONPATH=src; source bench/serve_start.sh || exit 1
for side in base new; do
    src=src; [[ $side == base ]] && src=bench/ab_base/src
    echo "##### server $side ($src)"
    PYTHONPATH=$src start_server LFM2-1.2B
    for c in 1 100; do
        n=8; [[ $c == 100 ]] && n=400
        PYTHONPATH=src timeout 60 python3 bench/serve.py --url "$url" --label LFM2-1.2B --tokenizer "$folder" \
            --concurrency $c --num-prompts $n --input-len 1024 --output-len 1024 --quiet --output-dir "$OUT/$side" \
            2>&1 | grep -v "^$" | grep -E "concurrency|^\| |in flight" | tee -a "$OUT/serve-$side.log"
    done
    kill -TERM "$pid"; wait "$pid"
done
