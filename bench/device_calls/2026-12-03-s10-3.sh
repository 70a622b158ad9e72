#!/usr/bin/env bash
# Device call 3 of session 10 (2026-12-03).
# 1. bench/decode_attention.py: the paged decode kernel at batch 100, 1k and 2k of history: splits x num_warps x
#    num_stages against the K/V bytes;
# 2. the server (LFM2-1.2B, defaults, no trace) at c=1 (8 requests) and c=100 (400 new prompts), the figures
#    of record for the session's code (gc.freeze of the start-up heaps).
set -uo pipefail
OUT=${OUT:-/tmp/fastlfm-out}; mkdir -p "$OUT"; export OUT
export PYTHONUNBUFFERED=1
LOG=$OUT/call.log
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$LOG"
echo "##### 1. decode attention" | tee -a "$LOG"
PYTHONPATH=src timeout 150 python3 bench/decode_attention.py 2>&1 | grep -v "^  splits" | tee -a "$LOG"
export PYTHONPATH=src; source bench/serve_start.sh || exit 1
echo "##### 2. server" | tee -a "$LOG"
PYTHONPATH=src:/tmp/site start_server LFM2-1.2B
for c in 1 100; do
    n=8; [[ $c == 100 ]] && n=400
    PYTHONPATH=src:/tmp/site timeout 60 python3 bench/serve.py --url "$url" --label LFM2-1.2B --tokenizer "$folder" \
        --concurrency $c --num-prompts $n --input-len 1024 --output-len 1024 --seed $((c + 1)) --quiet --output-dir "$OUT/serve" \
        2>&1 | grep -v "^$" | grep -E "concurrency|^\| [0-9]|in flight|server counted" | tee -a "$LOG"
done
kill -TERM "$pid"; wait "$pid"
rm -rf "$OUT/serve"
