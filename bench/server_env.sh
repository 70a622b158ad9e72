# Sourced by the server stages of bench/device_run.sh (serve_stage.sh, stage "prefix"): installs the
# server's wheels carried in .whl (bench/server_wheels.sh makes them) into /tmp/site and checks that
# fastapi, uvicorn and pydantic import; returns 1 if they do not.
export PYTHONPATH=${PYTHONPATH:-src} PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the server wheels failed"; return 1; }
    export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
python3 -c "import fastapi, uvicorn, pydantic; print('fastapi', fastapi.__version__, 'uvicorn', uvicorn.__version__, 'pydantic', pydantic.VERSION)" \
    || { echo "the server's packages are missing: run bench/server_wheels.sh before the call and carry .whl"; return 1; }
