#!/usr/bin/env bash
# The pod's path on a GPU machine that has PyTorch and transformers but no internet and no vLLM:
# an S3 server on loopback, a generated tiny Llama staged into it, `simswarm-agent pull` timed, then
# the model loaded offline from the pulled cache onto the GPU and a few tokens generated
# (bench/gpu_check.py does the work; on a machine without a GPU it loads on the CPU).
#
#   bench/gpu_check.sh --fetch-wheels      here, with pip and network: the agent's missing Python
#                                          packages as wheels for the GPU image (Python 3.12) in .whl/
#   bench/gpu_check.sh [gpu_check.py args] there: install .whl/ if present, then run the check
#                                          e.g. --size-mib 512 --engines auto,python --out "$OUT/gpu_check.json"
#
# On the device machine: carry `.whl` and `agent/_native.abi3.so` (the native engine; without it `auto`
# uses the python engine).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
WHEELS=.whl
PYTHON=${PYTHON:-python3}
# What the GPU image lacks (it has requests, werkzeug, jinja2, click, pyyaml, psutil, numpy,
# safetensors, huggingface_hub, python-dateutil, urllib3): boto3 for the agent, moto (server) for S3.
PACKAGES=(
    boto3==1.43.11 botocore==1.43.11 s3transfer==0.17.0 jmespath==1.1.0
    moto==5.2.1 xmltodict==1.0.4 responses==0.26.0 cryptography==48.0.0 cffi==2.0.0 pycparser==3.0
    flask==3.1.3 flask-cors==6.0.2 blinker==1.9.0 itsdangerous==2.2.0
)

fetch_wheels() {
    mkdir -p "$WHEELS"
    if [[ -d .git/info ]] && ! grep -qx "/$WHEELS/" .git/info/exclude 2>/dev/null; then
        echo "/$WHEELS/" >>.git/info/exclude # never committed, carried to the device machine instead
    fi
    local platforms=()
    local p
    for p in manylinux_2_34_x86_64 manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
        platforms+=(--platform "$p")
    done
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d "$WHEELS" "${PACKAGES[@]}"
    du -sh "$WHEELS"
}

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    fetch_wheels
    exit 0
fi

if compgen -G "$WHEELS/*.whl" >/dev/null; then
    site=$(mktemp -d /tmp/gpu-check-site.XXXXXX)
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$WHEELS"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if command -v nvidia-smi >/dev/null; then nvidia-smi -L || true; fi
"$PYTHON" -c 'import sys; print("python", sys.version.split()[0])'
exec "$PYTHON" bench/gpu_check.py "$@"
