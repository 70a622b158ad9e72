#!/usr/bin/env bash
# Device call 5 of session 6 (2026-12-02): where the time to first token goes at concurrency 1 (issue 16):
# LFM2-1.2B, 1,024-token prompts, 16 requests, with the host trace (bench/host_trace).
set -uo pipefail
OUT=${OUT:-/tmp/fastlfm-out}; mkdir -p "$OUT"; export OUT
export PYTHONUNBUFFERED=1
source bench/server_env.sh
PYTHONPATH=src:/tmp/site:bench/host_trace FASTLFM_TRACE=$OUT/ttft_trace.jsonl timeout 240 python3 bench/serve.py LFM2-1.2B \
    --concurrency 1 --num-prompts 16 --input-len 1024 --output-len 64 --output-dir /tmp/ttft 2>&1 | grep -E "^\| 1 |TTFT" \
    | tee "$OUT/ttft.log"
PYTHONPATH=src python3 bench/host_trace/report.py "$OUT/ttft_trace.jsonl" --turns 1 2>&1 | tee -a "$OUT/ttft.log"
