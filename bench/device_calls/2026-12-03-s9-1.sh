#!/usr/bin/env bash
# Device call 1 of session 9 (2026-12-03), issue 16. New: a prefill step on CUDA runs its RMSNorms,
# SiLU*mul, gated convs and QK-norm + RoPE as Triton kernels (engine/kernels/rowwise.py, conv.py) and
# adds the residual in the GEMM (addmm); eagerly those were ~40% of a 16k-token step's GPU time. Also the
# first GPU run of the benchmark client that deals requests in proportion to its processes' slots.
# bench/ab_base/src is commit ced146c's src (untracked, carried by the working tree; made with
# `mkdir -p bench/ab_base && git archive ced146c src | tar -x -C bench/ab_base`).
# In order of importance (each part writes its log under $OUT, so a cut call keeps what ran):
# 1. with CHECKS=1, the kernel checks (new kernels in bf16, the engine on the Triton path with prefill graphs):
#    the call's first try ran them (unconditionally then), the second, whose figures BENCHMARKS.md reports, did not;
# 2. the server on the new code (LFM2-1.2B, c=1 with 8 requests, c=100 with 400; the client is src's);
# 3. bench/steps.py on the new code: prefill tok/s beside transformers, one 1k prompt, kernels of a 16k
#    prefill, decode steps at batch 100;
# 4. the same server runs on ced146c's src; 5. bench/steps.py on ced146c's src (no transformers).
set -uo pipefail
OUT=${OUT:-/tmp/fastlfm-out}; mkdir -p "$OUT"; export OUT
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
[[ -n "${CHECKS:-}" ]] && PYTHONPATH=src timeout 100 python3 bench/check_kernels.py 2>&1 | grep -v "^$" | tail -40 > "$OUT/check_kernels.log"
[[ -n "${CHECKS:-}" ]] && grep -E "FAIL|DIFFER|rows:|qk|engine" "$OUT/check_kernels.log"
export PYTHONPATH=src; source bench/serve_start.sh || exit 1
serve_side() {  # serve_side LABEL SRC
    echo "##### server $1 ($2)"
    PYTHONPATH=$2:/tmp/site start_server LFM2-1.2B
    for c in 1 100; do
        n=8; [[ $c == 100 ]] && n=400
        PYTHONPATH=src:/tmp/site timeout 60 python3 bench/serve.py --url "$url" --label LFM2-1.2B --tokenizer "$folder" \
            --concurrency $c --num-prompts $n --input-len 1024 --output-len 1024 --quiet --output-dir "$OUT/$1" \
            2>&1 | grep -v "^$" | grep -E "concurrency|^\| |in flight" | tee -a "$OUT/serve-$1.log"
    done
    kill -TERM "$pid"; wait "$pid"
}
steps_side() {  # steps_side LABEL SRC [flags]
    local label=$1 src=$2; shift 2
    PYTHONPATH=$src:/tmp/site timeout 150 python3 bench/steps.py --label $label --decode-batch 100 "$@" 2>&1 | grep -v "^$" \
        | grep -vi "warn" | tail -45 > "$OUT/steps-$label.log"
    grep -E "^\||x$|ms a step|GPU time" "$OUT/steps-$label.log"
}
serve_side new src
steps_side new src
serve_side base bench/ab_base/src
steps_side base bench/ab_base/src --no-hf
