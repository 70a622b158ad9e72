#!/usr/bin/env bash
# Everything this project measures on the GPU machine, in one call (device tool):
#   bash bench/device_run.sh [gpu.py args...]
# Kernel checks, then the text engine benchmark (bench/gpu.py), then LFM2-VL (bench/vl.py).
# STAGES picks a subset ("kernels gpu vl" by default; "gemm" adds bench/skinny_gemm.py, about two
# minutes); each stage runs under its own time limit (KERNELS_S, GPU_S, VL_S, GEMM_S seconds) so
# one slow stage cannot eat a whole device call.
# Logs and tables go to $OUT (or /tmp/fastlfm-out).
set -uo pipefail
OUT=${OUT:-/tmp/fastlfm-out}; mkdir -p "$OUT"; export OUT
export PYTHONPATH=src PYTHONUNBUFFERED=1
STAGES=${STAGES:-kernels gpu vl}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
stage() { [[ " $STAGES " == *" $1 "* ]]; }
stage kernels && timeout "${KERNELS_S:-120}" python3 bench/check_kernels.py 2>&1 | tee "$OUT/check_kernels.log"
stage gpu && timeout "${GPU_S:-480}" python3 bench/gpu.py "$@" 2>&1 | tee "$OUT/gpu.log"
stage gemm && timeout "${GEMM_S:-240}" python3 bench/skinny_gemm.py 2>&1 | tee "$OUT/skinny_gemm.log"
stage vl && timeout "${VL_S:-300}" python3 bench/vl.py 2>&1 | tee "$OUT/vl.log"
exit 0
