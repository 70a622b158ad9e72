#!/usr/bin/env bash
# Device call 1 of session 14 (2026-12-04): a regression check of the GPU path after CPU-side changes to code it
# shares (model_runner: the graph step's argmax through sampling.argmax_rows, optional in-flight selection;
# PagedContext: slot_mapping / context_lens computed on first read; Lfm2ForCausalLM: the head may take the final
# norm). 1. engine tokens vs transformers (LFM2-350M, LFM2-1.2B, LFM2-8B-A1B); 2. bench/gpu.py on LFM2-350M
# (compiled decode graphs, prefill graphs) with transformers as the peer.
set -uo pipefail
OUT=${OUT:-/tmp/fastlfm-out}; mkdir -p "$OUT"; export OUT
export PYTHONPATH=src PYTHONUNBUFFERED=1
LOG=$OUT/call.log
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$LOG"
echo "##### 1. correctness" | tee -a "$LOG"
timeout 240 python3 bench/gpu.py --models LFM2-350M LFM2-1.2B LFM2-8B-A1B --correctness-only 2>&1 | grep -vi warn \
    | tail -25 | tee -a "$LOG"
echo "##### 2. bench/gpu.py LFM2-350M" | tee -a "$LOG"
timeout 300 python3 bench/gpu.py --models LFM2-350M 2>&1 | grep -vi warn | tail -30 | tee -a "$LOG"
