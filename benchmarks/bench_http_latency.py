"""End-to-end HTTP latency as an annotator feels it, against the real server on loopback.

    .venv/bin/python benchmarks/bench_http_latency.py [--slices 5] [--clicks 4]

- 2D: the first prompt on a new 512x512 CT slice (real TotalSegmentator CT series from
  ../shared/data, converted to NIfTI), then further clicks on the same slice; medians over slices.
- The same against a baseline server that re-encodes the slice on every click (embedding cache off,
  which is what MONAI Label's SAM2 task does), and against MONAI Label's own serial endpoint
  (``--conf scheduler false``), both started by this script in the same run.
- Where a cached click's time goes (answers as JSON, as the raw NRRD OHIF asks for, and as the
  multipart answer 3D Slicer gets): the HTTP round trip, the scheduler's queue wait and job (from the
  ``Server-Timing`` header), MONAI Label's pipeline around the engine, the engine, the decoder.
- 3D: propagation time per slice on the spleen CT from one box on its middle slice: once on the server
  with the embedding cache (nothing of the spleen cached yet), and ``--repeats-3d`` times on the server
  without one (every repeat encodes every slice again), median printed.
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

sys.path.insert(0, str(ROOT / "apps" / "medsam_adapter"))

SERIES = ROOT.parent / "shared" / "data" / "dicom" / "ct_totalseg_series"


def series_to_nifti(folder: Path, out: Path) -> Path:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    sitk.WriteImage(reader.Execute(), str(out))
    return out


HTTP = requests.Session()


def server_timing(header: str) -> dict[str, float]:
    """``queue;dur=1.2, infer;dur=40.1`` -> {"queue": 1.2, "infer": 40.1} (empty without a scheduler)."""
    out = {}
    for part in header.split(","):
        name, _, rest = part.strip().partition(";")
        if rest.startswith("dur="):
            out[name] = float(rest[4:])
    return out


def infer(url: str, model: str, image: str, params: dict, output: str = "json") -> tuple[float, dict, dict]:
    """(wall ms, answer params, Server-Timing) of one request; ``output`` json, image or all."""
    from lib.core.eval_backends import decode_infer_answer

    body = {"result_extension": ".nrrd", "result_dtype": "uint8", "client_id": "bench", **params}
    if output == "image":
        body["result_compress"] = False  # as OHIF asks
    query = {"image": image} if output == "all" else {"image": image, "output": output}
    start = time.perf_counter()
    r = HTTP.post(f"{url}/infer/{model}", params=query, files={"params": (None, json.dumps(body))}, timeout=600)
    elapsed = (time.perf_counter() - start) * 1e3
    r.raise_for_status()
    if output == "json":
        answer = r.json()
    elif output == "all":
        answer = decode_infer_answer(r)[0]
    else:
        answer = {}
    return elapsed, answer, server_timing(r.headers.get("Server-Timing", ""))


def cached_click_breakdown(url: str, image: str, shape: tuple[int, ...], k: int, clicks: int) -> dict:
    """Median milliseconds of further clicks on one cached slice, per answer format, split by stage."""
    cx, cy = shape[0] // 2, shape[1] // 2
    box = [cx - 60, cx + 60, cy - 50, cy + 50, k, k]
    infer(url, "medsam_2d", image, {"roi": box, "slice": k, "reset_state": True})
    out = {}
    for output in ("json", "image", "all"):
        rows = []
        for n in range(clicks):
            fg = [[cx + 3 * (n % 5), cy - 2 * (n % 3), k]]
            ms, answer, timing = infer(url, "medsam_2d", image, {"roi": box, "foreground": fg, "slice": k}, output)
            rows.append((ms, timing.get("queue", 0.0), timing.get("infer", 0.0), answer))
        med = lambda values: round(statistics.median(values), 1)  # noqa: E731
        wall, queue, job = med([r[0] for r in rows]), med([r[1] for r in rows]), med([r[2] for r in rows])
        entry = {"http_wall_ms": wall, "scheduler_queue_ms": queue, "scheduler_job_ms": job}
        if job:
            entry["http_and_framework_ms"] = round(wall - queue - job, 1)
        if output != "image":  # the raw label answer carries no params
            engine = med([r[3]["latency_ms"]["total"] for r in rows])
            entry["engine_total_ms"] = engine
            entry["decoder_ms"] = med([r[3]["latency_ms"]["decoder"] for r in rows])
            entry["monailabel_write_ms"] = med([r[3]["latencies"]["write"] * 1e3 for r in rows])  # 10 ms steps
            if job:
                entry["monailabel_pipeline_and_answer_ms"] = round(job - engine, 1)
        out[output] = entry
    return out


def click_session(url: str, image: str, shape: tuple[int, ...], slices: list[int], clicks: int) -> dict:
    first, further = [], []
    rng = np.random.default_rng(0)
    cx, cy = shape[0] // 2, shape[1] // 2
    for k in slices:
        box = [cx - 60, cx + 60, cy - 50, cy + 50, k, k]
        ms, _, _ = infer(url, "medsam_2d", image, {"roi": box, "slice": k, "label": "organ", "reset_state": True})
        first.append(ms)
        fg = []
        for _ in range(clicks):
            fg.append([int(cx + rng.integers(-30, 30)), int(cy + rng.integers(-25, 25)), k])
            ms, _, _ = infer(url, "medsam_2d", image, {"roi": box, "foreground": fg, "slice": k, "label": "organ"})
            further.append(ms)
    return {
        "first_prompt_median_ms": round(statistics.median(first), 1),
        "further_click_median_ms": round(statistics.median(further), 1),
        "further_click_p90_ms": round(float(np.percentile(further, 90)), 1),
        "first_over_further_ratio": round(statistics.median(first) / statistics.median(further), 1),
        "n_first": len(first),
        "n_further": len(further),
    }


def spleen_box() -> list[int]:
    """A tight ROI on the middle labelled slice of the shipped spleen CT."""
    import nibabel as nib

    label = nib.load(str(ROOT / "sample-data" / "reference" / "spleen_ct.nii.gz")).get_fdata() > 0
    ks = np.nonzero(label.any(axis=(0, 1)))[0]
    mid = int(ks[len(ks) // 2])
    ii, jj = np.nonzero(label[:, :, mid])
    return [int(ii.min()), int(ii.max()), int(jj.min()), int(jj.max()), mid, mid]


def propagation_3d(url: str, roi: list[int]) -> dict:
    """One ``medsam_3d`` request from ``roi`` on the spleen CT: wall time per segmented slice and the
    engine's encoder and decoder totals."""
    ms, result, _ = infer(url, "medsam_3d", "spleen_ct", {"roi": roi})
    return {
        "wall_ms": round(ms, 1),
        "slices_segmented": result["slices_segmented"],
        "per_slice_ms": round(ms / max(result["slices_segmented"], 1), 1),
        "encoder_ms_total": result["latency_ms"]["encoder"],
        "decoder_ms_total": result["latency_ms"]["decoder"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=5)
    parser.add_argument("--clicks", type=int, default=4)
    parser.add_argument("--breakdown-clicks", type=int, default=15, help="cached clicks per answer format")
    parser.add_argument("--repeats-3d", type=int, default=3, help="3D propagations on the server without a cache")
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

    servers = (
        ("with_embedding_cache", {}),
        ("serial_monailabel_endpoint", {"scheduler": "false"}),
        ("baseline_reencode_every_click", {"embedding_cache_mb": "0"}),
    )
    for name, conf in servers:
        server = Server(studies, ROOT / "apps" / "medsam_adapter", work / f"{name}.log", conf)
        try:
            infer(server.url, "medsam_2d", "ct512", {"roi": [200, 300, 200, 300, 0, 0], "slice": 0})  # warm-up
            report[name] = click_session(server.url, "ct512", shape, [int(k) for k in slices], args.clicks)
            if name != "baseline_reencode_every_click":
                report[name]["cached_click_breakdown"] = cached_click_breakdown(
                    server.url, "ct512", shape, int(slices[0]), args.breakdown_clicks
                )
            if name == "with_embedding_cache":
                report["propagation_3d_spleen"] = propagation_3d(server.url, spleen_box())
            if name == "baseline_reencode_every_click" and args.repeats_3d > 0:
                roi = spleen_box()
                runs = [propagation_3d(server.url, roi) for _ in range(args.repeats_3d)]
                report["propagation_3d_spleen_uncached"] = {
                    "runs": runs,
                    "per_slice_ms_median": statistics.median(r["per_slice_ms"] for r in runs),
                    "encoder_ms_per_slice_median": statistics.median(
                        r["encoder_ms_total"] / max(r["slices_segmented"], 1) for r in runs
                    ),
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
