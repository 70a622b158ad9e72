# Sourced by the server stages of bench/device_run.sh (serve_stage.sh, stage "prefix"): the carried
# wheels (bench/wheels_env.sh), then a check that fastapi, uvicorn and pydantic import; returns 1 if not.
export PYTHONPATH=${PYTHONPATH:-src} PYTHONUNBUFFERED=1
source bench/wheels_env.sh || return 1
python3 -c "import fastapi, uvicorn, pydantic; print('fastapi', fastapi.__version__, 'uvicorn', uvicorn.__version__, 'pydantic', pydantic.VERSION)" \
    || { echo "the server's packages are missing: run bench/server_wheels.sh before the call and carry .whl"; return 1; }
