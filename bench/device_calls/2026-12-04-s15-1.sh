#!/usr/bin/env bash
# Device call 1 of session 15 (2026-12-04): structured output at batch 64 (issue 18) with greedy steps that
# skip the mask of a row whose grammar accepts its argmax (engine.grammar_argmax_first), masks filled while
# the device computes the argmax; A/B against every mask, tokens compared (bench/structured.py
# --argmax-first-ab). LFM2-1.2B shape, random bf16 weights. Then the CUDA path's engine tests that run here.
set -uo pipefail
OUT=${OUT:-/tmp/fastlfm-out}; mkdir -p "$OUT"; export OUT
export PYTHONPATH=src PYTHONUNBUFFERED=1
source bench/wheels_env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/call.log"
timeout 330 python3 bench/structured.py --batches 1 64 --repeats 2 --argmax-first-ab 2>&1 | grep -v "^$" \
    | grep -vi warn | tail -24 | tee -a "$OUT/call.log"
