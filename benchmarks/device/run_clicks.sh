#!/bin/bash
# On the GPU machine (see pack.sh --clicks): install the carried packages, then click-adapter rounds from
# the carried sample bank, several at once, each stopped after BUDGET seconds (default 420; the best
# epoch is written as it comes). Results under $OUT: <name>.pt and <name>.tar (record and log).
# Each argument is one round: NAME:"train_click_adapter.py options".
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .devclicks/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/.devclicks/nibabel_min.zip:$PWD/.devclicks/monai_min.zip OMP_NUM_THREADS=4
export PYTHONUNBUFFERED=1
nvidia-smi -L
for round in "$@"; do
  name=${round%%:*}; options=${round#*:}
  mkdir -p "/tmp/rounds/$name"
  # shellcheck disable=SC2086
  timeout "${BUDGET:-420}" python3 scripts/train_click_adapter.py --samples .devclicks/data $options \
    --out "/tmp/rounds/$name/$name.pt" > "/tmp/rounds/$name.log" 2>&1 &
done
wait
for round in "$@"; do
  name=${round%%:*}
  tail -3 "/tmp/rounds/$name.log"
  cp "/tmp/rounds/$name/$name.pt" "$OUT/" 2>/dev/null
  tar -cf "$OUT/$name.tar" -C /tmp/rounds "$name.log" $(cd /tmp/rounds && ls "$name"/*.json 2>/dev/null)
done
