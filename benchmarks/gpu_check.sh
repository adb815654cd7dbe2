#!/usr/bin/env bash
# One call on a lent GPU machine: the CUDA tests and the GPU benchmarks.
# Prepare here (wheels for the packages the GPU image lacks, Python 3.12):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform any -d .whl \
#     dagster==1.13.28 zarr==3.1.6 numcodecs==0.16.6 && rm .whl/numpy-*
# then run `bash benchmarks/gpu_check.sh` there with .whl carried.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 INFLUENCE_PIPELINE_CACHE=/tmp/ipcache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, dagster, zarr; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'dagster', dagster.__version__, 'zarr', zarr.__version__)"
mkdir -p "${OUT:-/tmp/out}"
python3 -m pytest -m gpu -q -p no:cacheprovider -W ignore -rs tests \
  2>&1 | tee "${OUT:-/tmp/out}/gpu_tests.txt" | tail -15
timeout 240 python3 benchmarks/engine_benchmark.py --quick --large --skip-pydvl \
  --json "${OUT:-/tmp/out}/engine_gpu.json" 2>&1 | tail -45
