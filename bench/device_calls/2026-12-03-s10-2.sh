#!/usr/bin/env bash
# Device call 2 of session 10 (2026-12-03).
# 1. the server (LFM2-1.2B, defaults) with its start-up heap frozen (gc.freeze): c=1 (8 requests), then c=100
#    twice (400 each), traced (steps, garbage collections >= 5 ms, Triton JIT keys in full). Call 1 (same code
#    before the freeze) had two 0.42-0.45 s decode steps at c=100;
# 2. bench/steps.py on LFM2-8B-A1B (random bf16 weights made on the GPU): prefill, one prompt, the kernels of
#    a 16k prefill and of decode steps at batch 100 (issue 17: 14.4k out tok/s against 20k).
set -uo pipefail
OUT=${OUT:-/tmp/fastlfm-out}; mkdir -p "$OUT"; export OUT
export PYTHONUNBUFFERED=1
LOG=$OUT/call.log
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$LOG"
export PYTHONPATH=src; source bench/serve_start.sh || exit 1
echo "##### 1. server, traced" | tee -a "$LOG"
PYTHONPATH=src:/tmp/site:bench/host_trace FASTLFM_TRACE=$OUT/trace.jsonl FASTLFM_TRACE_STEPS=1 start_server LFM2-1.2B
for c in 1 100 100; do
    n=8; [[ $c == 100 ]] && n=400
    PYTHONPATH=src:/tmp/site timeout 60 python3 bench/serve.py --url "$url" --label LFM2-1.2B --tokenizer "$folder" \
        --concurrency $c --num-prompts $n --input-len 1024 --output-len 1024 --quiet --output-dir "$OUT/serve" \
        2>&1 | grep -v "^$" | grep -E "concurrency|^\| [0-9]|in flight|server counted" | tee -a "$LOG"
done
kill -TERM "$pid"; wait "$pid"
python3 bench/host_trace/report.py "$OUT/trace.jsonl" --turns 3 --skip 0 --steps 2>&1 | cut -c1-400 | tee -a "$LOG"
rm -rf "$OUT/serve"
echo "##### 2. LFM2-8B-A1B steps" | tee -a "$LOG"
timeout 240 python3 bench/steps.py --model LFM2-8B-A1B --decode-batch 100 2>&1 | grep -v "^$" | grep -vi warn | tail -45 | tee -a "$LOG"
