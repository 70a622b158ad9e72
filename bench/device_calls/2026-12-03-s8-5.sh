#!/usr/bin/env bash
# Device call 5 of session 8 (2026-12-03), issue 16: the server at c=100 (LFM2-1.2B, text prompts, 400
# requests) with the bench's new "requests in flight on average": does the c=100 run keep 100 in flight?
set -uo pipefail
OUT=${OUT:-/tmp/fastlfm-out}; mkdir -p "$OUT"; export OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=src
source bench/server_env.sh || exit 1
folder=$(python3 -c "from fastlfm.server.benchmark import prepare_checkpoint; print(prepare_checkpoint('LFM2-1.2B', '/tmp'))")
port=$(python3 -c "from fastlfm.server.benchmark import free_port; print(free_port())")
url="http://127.0.0.1:$port"
python3 -m fastlfm.cli serve "$folder" --host 127.0.0.1 --port "$port" --served-model-name LFM2-1.2B \
    --max-request-bytes 16777216 --log-level warning > "$OUT/server.log" 2>&1 &
pid=$!
for i in $(seq 300); do curl -sf "$url/health" >/dev/null && break; sleep 1; done
echo "server up after ${i} s"
python3 bench/serve.py --url "$url" --label LFM2-1.2B --tokenizer "$folder" --concurrency 100 --num-prompts 400 \
    --input-len 1024 --output-len 1024 --quiet --output-dir "$OUT" 2>&1 | grep -v "^$" | grep -E "concurrency|^\| "
kill -TERM "$pid"; wait "$pid"
