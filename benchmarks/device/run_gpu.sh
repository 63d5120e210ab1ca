#!/bin/bash
# On the GPU machine (see pack.sh --gpu): install the carried packages, then benchmarks/bench_gpu.py
# (encoder runtimes, annotators at once with and without batched encodes, 3D propagation); under $OUT
# the JSON and the log. Arguments go to bench_gpu.py.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .devgpu/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/.devgpu/nibabel_min.zip PYTHONUNBUFFERED=1 MEDSAM_ADAPTER_RUNTIME_CACHE=/tmp/rtcache
nvidia-smi -L
python3 -m pytest -q --noconftest -p no:cacheprovider tests/test_cuda_graphs.py 2>&1 | tail -5 | tee "$OUT/pytest_cuda.log"
python3 benchmarks/bench_gpu.py --json "$OUT/bench_gpu.json" "$@" 2>&1 | grep -v -i "warn" | tee "$OUT/bench_gpu.log"
