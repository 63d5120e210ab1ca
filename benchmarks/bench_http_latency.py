"""End-to-end HTTP latency as an annotator feels it, against the real server on loopback.

    .venv/bin/python benchmarks/bench_http_latency.py [--slices 5] [--clicks 4]

- 2D: the first prompt on a new 512x512 CT slice (real TotalSegmentator CT series from
  ../shared/data, converted to NIfTI), then further clicks on the same slice; medians over slices.
- The same against a baseline server that re-encodes the slice on every click (embedding cache off,
  which is what MONAI Label's SAM2 task does), started by this script in the same run.
- 3D: propagation time per slice on the spleen CT from one box on its middle slice.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from live_server import Server  # noqa: E402

SERIES = ROOT.parent / "shared" / "data" / "dicom" / "ct_totalseg_series"


def series_to_nifti(folder: Path, out: Path) -> Path:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    sitk.WriteImage(reader.Execute(), str(out))
    return out


def infer(url: str, model: str, image: str, params: dict) -> tuple[float, dict]:
    body = {"result_extension": ".nrrd", "result_dtype": "uint8", "client_id": "bench", **params}
    start = time.perf_counter()
    r = requests.post(f"{url}/infer/{model}", params={"image": image, "output": "json"},
                      files={"params": (None, json.dumps(body))}, timeout=600)
    elapsed = (time.perf_counter() - start) * 1e3
    r.raise_for_status()
    return elapsed, r.json()


def click_session(url: str, image: str, shape: tuple[int, ...], slices: list[int], clicks: int) -> dict:
    first, further = [], []
    rng = np.random.default_rng(0)
    cx, cy = shape[0] // 2, shape[1] // 2
    for k in slices:
        box = [cx - 60, cx + 60, cy - 50, cy + 50, k, k]
        ms, _ = infer(url, "medsam_2d", image, {"roi": box, "slice": k, "label": "organ", "reset_state": True})
        first.append(ms)
        fg = []
        for _ in range(clicks):
            fg.append([int(cx + rng.integers(-30, 30)), int(cy + rng.integers(-25, 25)), k])
            ms, _ = infer(url, "medsam_2d", image, {"roi": box, "foreground": fg, "slice": k, "label": "organ"})
            further.append(ms)
    return {
        "first_prompt_median_ms": round(statistics.median(first), 1),
        "further_click_median_ms": round(statistics.median(further), 1),
        "further_click_p90_ms": round(float(np.percentile(further, 90)), 1),
        "first_over_further_ratio": round(statistics.median(first) / statistics.median(further), 1),
        "n_first": len(first),
        "n_further": len(further),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=5)
    parser.add_argument("--clicks", type=int, default=4)
    args = parser.parse_args()
    if not SERIES.is_dir():
        sys.exit(f"{SERIES} is needed for the 512x512 slices")

    work = Path(tempfile.mkdtemp(prefix="bench_http_"))
    studies = work / "studies"
    studies.mkdir()
    series_to_nifti(SERIES, studies / "ct512.nii.gz")
    shutil.copy(ROOT / "sample-data" / "spleen_ct.nii.gz", studies / "spleen_ct.nii.gz")
    import nibabel as nib

    shape = nib.load(str(studies / "ct512.nii.gz")).shape
    slices = list(np.linspace(2, shape[2] - 3, args.slices).astype(int))
    report: dict = {"image": f"ct512 {list(shape)}", "slices": [int(k) for k in slices]}

    for name, conf in (("with_embedding_cache", {}), ("baseline_reencode_every_click", {"embedding_cache_mb": "0"})):
        server = Server(studies, ROOT / "apps" / "medsam_adapter", work / f"{name}.log", conf)
        try:
            infer(server.url, "medsam_2d", "ct512", {"roi": [200, 300, 200, 300, 0, 0], "slice": 0})  # warm-up
            report[name] = click_session(server.url, "ct512", shape, [int(k) for k in slices], args.clicks)
            if name == "with_embedding_cache":
                label = nib.load(str(ROOT / "sample-data" / "reference" / "spleen_ct.nii.gz")).get_fdata() > 0
                ks = np.nonzero(label.any(axis=(0, 1)))[0]
                mid = int(ks[len(ks) // 2])
                ii, jj = np.nonzero(label[:, :, mid])
                roi = [int(ii.min()), int(ii.max()), int(jj.min()), int(jj.max()), mid, mid]
                ms, result = infer(server.url, "medsam_3d", "spleen_ct", {"roi": roi})
                report["propagation_3d_spleen"] = {
                    "wall_ms": round(ms, 1),
                    "slices_segmented": result["slices_segmented"],
                    "per_slice_ms": round(ms / max(result["slices_segmented"], 1), 1),
                    "encoder_ms_total": result["latency_ms"]["encoder"],
                    "decoder_ms_total": result["latency_ms"]["decoder"],
                }
        finally:
            server.stop()
    cached, baseline = report["with_embedding_cache"], report["baseline_reencode_every_click"]
    report["further_click_speedup_vs_baseline"] = round(
        baseline["further_click_median_ms"] / cached["further_click_median_ms"], 1
    )
    print(json.dumps(report, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
