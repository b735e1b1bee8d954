#!/usr/bin/env bash
# The benches on a GPU machine, in one command (under 8 minutes on one H100/H200):
# a GPT-2-medium-sized LM and an SD-1.5-sized pipeline built from configs
# (bench/gpu_models.py), fp16, then bench/continuous.py and bench/batching.py
# on them, embedded (SQLite, filesystem broker, local storage: a GPU box
# rarely has Postgres and Redis beside it), printing the same tables.
#
#   bash bench/gpu.sh            # needs the project installed (pip install -e .)
#
# A machine without network can install from a wheelhouse: put the wheels in
# .whl/ (pip download, for the machine's Python) and the script installs them first.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
models=${GENQ_GPU_MODELS:-/tmp/genq-gpu-models}
[ -d "$models/text" ] || $PY bench/gpu_models.py "$models"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# Threads: torch's default (0) on a GPU box; the CPU only feeds the device.
timeout 270 $PY bench/continuous.py --embedded --threads 0 --device cuda --dtype float16 \
  --checkpoint "$models/text" --jobs 120 --rate-factor 4
timeout 200 $PY bench/batching.py --embedded --threads 0 --device cuda --dtype float16 --repeats 1 \
  --text-checkpoint "$models/text" --image-checkpoint "$models/image" --jobs 64 --image-jobs 16
