"""Unpack .devdata/data/**/*.nii.xz into DEST/**/*.nii.gz (the device run's data folder; see pack.sh)."""

import gzip
import lzma
import sys
from pathlib import Path

src, dest = Path(__file__).parent / "data", Path(sys.argv[1])
for f in src.rglob("*.nii.xz"):
    out = dest / f.relative_to(src).with_suffix(".gz")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(gzip.compress(lzma.decompress(f.read_bytes()), compresslevel=1))
print("unpacked", sum(1 for _ in dest.rglob("*.nii.gz")), "files")
