#!/usr/bin/env bash
# Everything this project measures on the GPU machine, in one call (device tool):
#   bash bench/device_run.sh [gpu.py args...]
# Kernel checks, the projection-kernel tuner (bench/skinny_gemm.py --write-configs: the engine reads
# its table), the text engine benchmark (bench/gpu.py), LFM2-VL (bench/vl.py), the OpenAI server
# over HTTP (bench/serve_stage.sh: bench/serve.py and bench/reliability.py; it needs the server's
# wheels: run `bash bench/server_wheels.sh` here first and carry .whl), and LFM2-MoE (stage "moe":
# bench/gpu.py --models $MOE_MODELS, table in moe_table.md; MOE_ARGS adds options), structured
# output (stage "structured": bench/structured.py, JSON schema vs unconstrained decode tok/s, table in
# structured_table.md; llguidance comes from .whl like the server's packages), and prefix caching
# (stage "prefix": bench/prefix_cache.py on $PREFIX_MODEL, LFM2-1.2B by default: 64 conversations x 10
# turns with a 2k-token shared system prompt, served with and without the cache; PREFIX_ARGS adds
# options; the server wheels as for "serve").
# STAGES picks a subset ("kernels gemm gpu vl serve structured" by default; "moe" and "prefix" only when named);
# each stage runs under its own time limit (KERNELS_S, GEMM_S, GPU_S, VL_S, SERVE_S, STRUCTURED_S, MOE_S, PREFIX_S
# seconds) so one slow stage cannot eat a whole device call. Every stage runs; the exit status says whether any failed.
# Logs and tables go to $OUT (or /tmp/fastlfm-out).
set -uo pipefail
OUT=${OUT:-/tmp/fastlfm-out}; mkdir -p "$OUT"; export OUT
export PYTHONPATH=src PYTHONUNBUFFERED=1
STAGES=${STAGES:-kernels gemm gpu vl serve structured}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
stage() { [[ " $STAGES " == *" $1 "* ]]; }
rc=0
run_stage() {  # name, seconds, command...
    local name=$1 limit=$2; shift 2
    stage "$name" || return 0
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" || { echo "stage $name FAILED"; rc=1; }
}
run_stage kernels "${KERNELS_S:-120}" python3 bench/check_kernels.py
run_stage gemm "${GEMM_S:-240}" python3 bench/skinny_gemm.py --write-configs
run_stage gpu "${GPU_S:-480}" python3 bench/gpu.py "$@"
run_stage vl "${VL_S:-300}" python3 bench/vl.py
run_stage serve "${SERVE_S:-480}" bash bench/serve_stage.sh
run_stage structured "${STRUCTURED_S:-300}" bash -c 'source bench/wheels_env.sh && python3 bench/structured.py'
# shellcheck disable=SC2086
run_stage moe "${MOE_S:-480}" python3 bench/gpu.py --models ${MOE_MODELS:-LFM2-8B-A1B LFM2-24B-A2B} --table moe_table.md ${MOE_ARGS:-}
# Both servers with --no-compile: each starts in seconds instead of a minute (CUDA graphs of the eager
# step), the same for both runs; the comparison is of prefill work.
# shellcheck disable=SC2016,SC2086
run_stage prefix "${PREFIX_S:-300}" bash -c 'source bench/server_env.sh && python3 bench/prefix_cache.py \
    "${PREFIX_MODEL:-LFM2-1.2B}" --server-args=--no-compile '"${PREFIX_ARGS:-}"
exit $rc
