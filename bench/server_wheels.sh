#!/usr/bin/env bash
# The server's Python packages for the GPU machine, which has no package index and lacks
# fastapi, starlette, uvicorn, pydantic and llguidance (structured output: stages "serve" and
# "structured"; see /work/.library/device: wheels travel in .whl/).
# Run HERE, in the repo root of the checkout the device tool sends, before the device call:
#   bash bench/server_wheels.sh
# then name .whl in the call's `carry`; bench/device_run.sh installs them (bench/wheels_env.sh).
# The versions are those CI runs the tests with; Python 3.12, x86-64 (the GPU machine's).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_31_x86_64 -d .whl \
    fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.14.4 pydantic_core==2.50.5 \
    annotated-types==0.8.0 annotated-doc==0.0.7 typing-inspection==0.4.5 typing_extensions==4.16.0 \
    opentelemetry-api==1.45.2 anyio==4.16.0 llguidance==1.9.1
ls -la .whl
