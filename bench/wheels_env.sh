# Sourced by the stages that need packages the GPU machine lacks (it has no package index):
# installs the wheels that bench/server_wheels.sh downloaded into .whl/ (carried with the call)
# into /tmp/site and puts that on PYTHONPATH. No .whl/: nothing to do.
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the wheels of .whl/ failed"; return 1; }
    export PYTHONPATH=${PYTHONPATH:-src}:/tmp/site
fi
