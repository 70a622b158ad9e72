# Sourced by device call scripts: `start_server SHAPE [serve flags...]` writes (once) a random-weight
# checkpoint of SHAPE (fastlfm.server.benchmark.prepare_checkpoint), starts `fastlfm serve` on a free port
# with the server's defaults (log in $OUT/server.log) and waits for /health; sets folder, url and pid.
source bench/server_env.sh || return 1
start_server() {
    local shape=$1; shift
    folder=$(python3 -c "from fastlfm.server.benchmark import prepare_checkpoint; print(prepare_checkpoint('$shape', '/tmp'))")
    local port; port=$(python3 -c "from fastlfm.server.benchmark import free_port; print(free_port())")
    url="http://127.0.0.1:$port"
    python3 -m fastlfm.cli serve "$folder" --host 127.0.0.1 --port "$port" --served-model-name "$shape" \
        --max-request-bytes 16777216 --log-level warning "$@" > "$OUT/server.log" 2>&1 &
    pid=$!
    local i
    for i in $(seq 300); do curl -sf "$url/health" >/dev/null && break; kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    echo "server up after ${i} s"
}
