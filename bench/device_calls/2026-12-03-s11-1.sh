#!/usr/bin/env bash
# Device call 1 of session 11 (2026-12-03): issue 17 with the router in one Triton kernel (d2c255b).
# 1. the MoE kernel checks (experts and router, fp32 / bf16 / fp16);
# 2. bench/gpu.py --models LFM2-8B-A1B: batch-1 decode, 100 x 1k/1k through LLM.generate + tokenizer and the
#    raw engine, prefill, TTFT, memory, transformers in the same run (last full run: 2026-12-02, 67b1168).
set -uo pipefail
OUT=${OUT:-/tmp/fastlfm-out}; mkdir -p "$OUT"; export OUT
export PYTHONPATH=src PYTHONUNBUFFERED=1
LOG=$OUT/call.log
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$LOG"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$LOG"
echo "##### 1. MoE kernel checks" | tee -a "$LOG"
timeout 100 python3 bench/check_kernels.py --only moe 2>&1 | grep -vi warn | tee -a "$LOG"
echo "##### 2. bench/gpu.py LFM2-8B-A1B" | tee -a "$LOG"
timeout 430 python3 bench/gpu.py --models LFM2-8B-A1B --table moe_table.md --no-moe-kernel-ab 2>&1 | grep -v "^$" \
    | grep -vi warn | tail -60 | tee -a "$LOG"
