#!/usr/bin/env bash
# Device call 4 of session 8 (2026-12-03), issue 16: is the server's c=100 gap in preparing requests?
# One `fastlfm serve` (LFM2-1.2B, the defaults of bench/serve_stage.sh), then bench/serve.py at c=100 three
# times: text prompts (the server tokenizes them), token-id prompts (no tokenizing), text prompts again.
set -uo pipefail
OUT=${OUT:-/tmp/fastlfm-out}; mkdir -p "$OUT"; export OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=src
source bench/serve_start.sh || exit 1
start_server LFM2-1.2B
for fmt in text ids text; do
    echo "##### prompts as $fmt"
    timeout 90 python3 bench/serve.py --url "$url" --label "LFM2-1.2B-$fmt" --tokenizer "$folder" --concurrency 100 \
        --input-len 1024 --output-len 1024 --prompt-format "$fmt" --quiet --output-dir "$OUT" 2>&1 \
        | grep -v "^$" | grep -E "concurrency|^\| "
done
kill -TERM "$pid"; wait "$pid"
