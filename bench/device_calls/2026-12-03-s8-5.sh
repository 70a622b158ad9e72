#!/usr/bin/env bash
# Device call 5 of session 8 (2026-12-03), issue 16: the server at c=100 (LFM2-1.2B, text prompts, 400
# requests) with the bench's new "requests in flight on average": does the c=100 run keep 100 in flight?
set -uo pipefail
OUT=${OUT:-/tmp/fastlfm-out}; mkdir -p "$OUT"; export OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=src
source bench/serve_start.sh || exit 1
start_server LFM2-1.2B
python3 bench/serve.py --url "$url" --label LFM2-1.2B --tokenizer "$folder" --concurrency 100 --num-prompts 400 \
    --input-len 1024 --output-len 1024 --quiet --output-dir "$OUT" 2>&1 | grep -v "^$" | grep -E "concurrency|^\| "
kill -TERM "$pid"; wait "$pid"
