#!/usr/bin/env bash
# Stage "serve" of bench/device_run.sh: the OpenAI server over HTTP on the GPU (issue 16).
# For each of $SERVE_MODELS (default "LFM2-350M LFM2-1.2B": random bf16 weights with the full-size
# test tokenizer; a checkpoint folder works too): start `fastlfm serve` once (CUDA, torch.compile'd
# decode step: its defaults), run bench/serve.py against it (1k in / 1k out at concurrency 1, 16,
# 100), for the models in $RELIABILITY_MODELS (default "LFM2-1.2B") bench/reliability.py (1,000
# mixed requests; at most RELIABILITY_S seconds, 120 by default: with the O(k^2) detokenizer an
# adversarial request of 1,024 never-completing bytes costs minutes of engine time, and it is
# then dropped after 60 s and counted as failed), then SIGTERM it and time its exit. Everything is printed (the stage log) and
# the reports are merged into $OUT/serve.json (the device tool returns at most 8 files).
# Needs fastapi/uvicorn/pydantic there: `bash bench/server_wheels.sh` here first, carry .whl.
# A CPU dry run: SERVE_MODELS=/path/ckpt SERVE_FLAGS="--device cpu --dtype float32"
#   BENCH_FLAGS="--input-len 64 --output-len 16 --concurrency 1 4" RELIABILITY_MODELS=/path/ckpt
#   RELIABILITY_FLAGS="--requests 100 --concurrency 4 --max-tokens 8 --adversarial-tokens 32" bash bench/serve_stage.sh
set -uo pipefail
OUT=${OUT:-/tmp/fastlfm-out}; mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/fastlfm-serve.XXXX)
SERVE_MODELS=${SERVE_MODELS:-LFM2-350M LFM2-1.2B}
RELIABILITY_MODELS=${RELIABILITY_MODELS:-LFM2-1.2B}
LIMITS="--max-request-bytes 16777216 --header-timeout 5 --body-timeout 10"
source bench/server_env.sh || exit 1
rc=0
for model in $SERVE_MODELS; do
    label=$(basename "$model")
    echo "=== $label"
    folder=$(python3 -c "from fastlfm.server.benchmark import prepare_checkpoint; print(prepare_checkpoint('$model', '/tmp'))") \
        || { rc=1; continue; }
    port=$(python3 -c "from fastlfm.server.benchmark import free_port; print(free_port())")
    url="http://127.0.0.1:$port"
    # shellcheck disable=SC2086
    python3 -m fastlfm.cli serve "$folder" --host 127.0.0.1 --port "$port" --served-model-name "$label" $LIMITS \
        ${SERVE_FLAGS:-} --log-level warning > "$WORK/server-$label.log" 2>&1 &
    pid=$!
    if ! python3 - "$url" "$pid" <<'PY'
import os, sys, time, httpx
url, pid, started = sys.argv[1], int(sys.argv[2]), time.monotonic()
while time.monotonic() - started < 600:
    try:
        if httpx.get(url + "/health", timeout=2).status_code == 200:
            print(f"server up in {time.monotonic() - started:.0f} s"); sys.exit(0)
    except httpx.TransportError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        break
    time.sleep(1)
sys.exit(1)
PY
    then
        echo "the server for $label did not start:"; tail -50 "$WORK/server-$label.log"; kill -9 "$pid" 2>/dev/null; rc=1
        continue
    fi
    # shellcheck disable=SC2086
    python3 bench/serve.py --url "$url" --label "$label" --tokenizer "$folder" --concurrency 1 16 100 \
        --input-len 1024 --output-len 1024 --quiet --output-dir "$WORK" ${BENCH_FLAGS:-} || rc=1
    if [[ " $RELIABILITY_MODELS " == *" $model "* ]]; then
        # shellcheck disable=SC2086
        python3 bench/reliability.py --url "$url" --tokenizer "$folder" $LIMITS --output-dir "$WORK" \
            --time-limit "${RELIABILITY_S:-120}" --request-timeout 60 ${RELIABILITY_FLAGS:-} || rc=1
        mv "$WORK/reliability.json" "$WORK/reliability_$label.json" 2>/dev/null
    fi
    t0=$(date +%s%N)
    kill -TERM "$pid"; wait "$pid"; code=$?
    echo "SIGTERM: the server exited with status $code after $(( ($(date +%s%N) - t0) / 1000000 )) ms"
    echo "--- server log (tail)"; tail -20 "$WORK/server-$label.log"
done
python3 - "$WORK" "$OUT/serve.json" <<'PY'
import json, pathlib, sys
work, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
merged = {p.stem: json.loads(p.read_text()) for p in sorted(work.glob("*.json"))}
out.write_text(json.dumps(merged, indent=1))
print("wrote", out, "with", ", ".join(merged) or "nothing")
PY
exit $rc
