#!/bin/bash
# On the GPU machine (see pack.sh): install the carried packages, unpack the data, then the design table,
# results under $OUT. Environment: SEEDS (default 0), JOBS (rounds at once, default 8), BUDGET (seconds).
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .devdata/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/.devdata/nibabel_min.zip:$PWD/.devdata/monai_min.zip OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
python3 .devdata/unpack.py /tmp/data || exit 1
nvidia-smi -L
end=$((SECONDS + ${BUDGET:-480}))
for seed in ${SEEDS:-0}; do
  left=$((end - SECONDS)); [ $left -lt 60 ] && break
  timeout $left python3 benchmarks/bench_designs.py --data /tmp/data --jobs "${JOBS:-8}" --seed "$seed" \
    --out "$OUT/designs_seed$seed.json" "$@" 2>&1 | tee "$OUT/log_seed$seed.txt" | grep -v '^{'
done
