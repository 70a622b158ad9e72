#!/usr/bin/env bash
# Device call 4 of session 10 (2026-12-03): two history splits for paged decode attention at batch 17-131
# (num_history_splits; call 3 measured them at batch 100 only).
# 1-2. the server (LFM2-1.2B, defaults + serve_stage.sh's limits): c=1 (8 requests), c=100 (400 new prompts), then
#    bench/reliability.py at full scale (1,000 mixed requests), SIGTERM timed;
# 3. bench/decode_attention.py --splits-only at batch 32, 64, 100, 128 and 1k / 2k of history;
# (LFM2-350M: cut, see the end.)
set -uo pipefail
OUT=${OUT:-/tmp/fastlfm-out}; mkdir -p "$OUT"; export OUT
export PYTHONUNBUFFERED=1
LOG=$OUT/call.log
LIMITS="--max-request-bytes 16777216 --header-timeout 5 --body-timeout 10"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$LOG"
export PYTHONPATH=src; source bench/serve_start.sh || exit 1
serve_model() {  # serve_model SHAPE [reliability]
    echo "##### server $1" | tee -a "$LOG"
    PYTHONPATH=src:/tmp/site start_server "$1" $LIMITS
    for c in 1 100; do
        n=8; [[ $c == 100 ]] && n=400
        PYTHONPATH=src:/tmp/site timeout 60 python3 bench/serve.py --url "$url" --label "$1" --tokenizer "$folder" \
            --concurrency $c --num-prompts $n --input-len 1024 --output-len 1024 --seed $((c + 1)) --quiet --output-dir "$OUT/serve" \
            2>&1 | grep -v "^$" | grep -E "concurrency|^\| [0-9]|in flight|server counted" | tee -a "$LOG"
    done
    if [[ -n "${2:-}" ]]; then
        PYTHONPATH=src:/tmp/site timeout 130 python3 bench/reliability.py --url "$url" --tokenizer "$folder" $LIMITS \
            --output-dir "$OUT/serve" --time-limit 110 --request-timeout 60 2>&1 | grep -v "^$" | tail -30 | tee -a "$LOG"
    fi
    t0=$(date +%s%N)
    kill -TERM "$pid"; wait "$pid"; code=$?
    echo "SIGTERM: exit status $code after $(( ($(date +%s%N) - t0) / 1000000 )) ms" | tee -a "$LOG"
    rm -rf "$OUT/serve"
}
serve_model LFM2-1.2B reliability
echo "##### 3. decode attention splits" | tee -a "$LOG"
PYTHONPATH=src timeout 60 python3 bench/decode_attention.py --splits-only --batch 32 64 100 128 2>&1 | grep -v "^  splits" | tee -a "$LOG"
# (LFM2-350M was cut from this call: a refused start left too little device time)
