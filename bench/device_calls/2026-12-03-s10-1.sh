#!/usr/bin/env bash
# Device call 1 of session 10 (2026-12-03). Where the c=100 time goes, and what the MoE and decode GEMMs could gain:
# 1. the server (LFM2-1.2B, defaults) at c=1 (8 requests) and c=100 (400), with the host trace and one line per
#    engine step (bench/host_trace, FASTLFM_TRACE_STEPS=1): report.py --steps sums the step timeline up;
# 2. bench/moe_tiles.py: the MoE experts' kernels over a grid of tiles at LFM2-8B-A1B's shape (100 and 16,384 tokens);
# 3. bench/decode_gemm.py: cuBLAS vs a split-K Triton GEMM at 100 rows, LFM2-1.2B's projection shapes;
# 4. bench/check_kernels.py --engine-only (dense and MoE engines on the Triton path with the prefill kernels).
# Everything goes to $OUT/call.log (the device tool returns few files) and the trace to $OUT/trace.jsonl.
set -uo pipefail
OUT=${OUT:-/tmp/fastlfm-out}; mkdir -p "$OUT"; export OUT
export PYTHONUNBUFFERED=1
LOG=$OUT/call.log
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$LOG"
export PYTHONPATH=src; source bench/serve_start.sh || exit 1
echo "##### 1. server, traced" | tee -a "$LOG"
PYTHONPATH=src:/tmp/site:bench/host_trace FASTLFM_TRACE=$OUT/trace.jsonl FASTLFM_TRACE_STEPS=1 start_server LFM2-1.2B
for c in 1 100; do
    n=8; [[ $c == 100 ]] && n=400
    PYTHONPATH=src:/tmp/site timeout 60 python3 bench/serve.py --url "$url" --label LFM2-1.2B --tokenizer "$folder" \
        --concurrency $c --num-prompts $n --input-len 1024 --output-len 1024 --quiet --output-dir "$OUT/serve" \
        2>&1 | grep -v "^$" | grep -E "concurrency|^\| |in flight" | tee -a "$LOG"
    echo "## trace after c=$c" >> "$LOG"
done
kill -TERM "$pid"; wait "$pid"
python3 bench/host_trace/report.py "$OUT/trace.jsonl" --turns 2 --skip 0 --steps 2>&1 | tee -a "$LOG"
rm -rf "$OUT/serve"
echo "##### 2. MoE tiles" | tee -a "$LOG"
timeout 130 python3 bench/moe_tiles.py --tokens 100 16384 2>&1 | grep -v "^  M" | tee -a "$LOG"
echo "##### 3. decode GEMMs at 100 rows" | tee -a "$LOG"
timeout 100 python3 bench/decode_gemm.py 2>&1 | grep -v "^  " | tee -a "$LOG"
echo "##### 4. engine checks" | tee -a "$LOG"
timeout 120 python3 bench/check_kernels.py --engine-only 2>&1 | grep -v "^$" | tail -12 | tee -a "$LOG"
