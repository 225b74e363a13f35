#!/usr/bin/env bash
# The one prepared accelerator run (issue 23): installs what the device image lacks, then
# benchmarks/gpu_check.py. On the H200 image (Python 3.12, its own jax 0.11.2 + CUDA 13 plugin, flax,
# optax, orbax, transformers, no network) with the two missing packages carried as wheels in .whl/:
#
#   here:   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#               --platform manylinux2014_x86_64 -d .whl ml-collections==1.1.0 tensorboardX==2.6.5
#   device: bash benchmarks/gpu_check.sh "$OUT"            (carry .whl; ~8 min)
#
# With a network instead: pip install -e ".[cuda]" && python benchmarks/gpu_check.py --out=DIR
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if ! "$PY" -c "import ml_collections, tensorboardX" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null | tee "$OUT/nvidia_smi.csv"
"$PY" benchmarks/gpu_check.py --out="$OUT" "${@:2}"
