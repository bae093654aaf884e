#!/bin/sh
# The GPU check (bench/gpu.py; arguments go to it). Installs only .gpu/wheels, which `python bench/gpu.py --pack .gpu`
# fills with requirements.txt's packages that the GPU image lacks (no index, no downloads), then runs the check.
cd "$(dirname "$0")/.." && { [ ! -d .gpu/wheels ] || python3 -m pip install -q --no-index --no-deps --target /tmp/gpu-site .gpu/wheels/*.whl; }; PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}" exec python3 bench/gpu.py "$@"
