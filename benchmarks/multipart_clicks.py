"""Click sessions on objects in several pieces, on training data: where part-wise corrections are tuned.

    .venv/bin/python benchmarks/multipart_clicks.py [--methods shipped,NAME=PATH] [--inference KEY=VALUE]
        [--clicks 8] [--slices 8] [--out results.json]

Two objects that come in pieces on a slice: every MS lesion of ``../shared/data/mr_ms_lesions`` patient26
(the MS train part; up to 11 lesions a slice) and both kidneys of the sample abdomen CT as one object
(``sample-data``). Both are in the click adapter's training data, so these numbers choose inference
settings; held-out numbers come from ``benchmarks/readme_results.sh`` (BraTS, MS patient07, ...). The
simulated annotator and sessions are the evaluation suite's (``lib/core/evaluation.py``). Prints the mean
Dice after 1..N clicks per object kind and each session's curve with its number of pieces.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from evaluate import backend_for  # noqa: E402  (also puts the app on sys.path)

from lib.core.config import ProfileError, setting_pairs  # noqa: E402
from lib.core.datasets import LabelledCase, case_folders  # noqa: E402
from lib.core.evaluation import EvalSettings, dice_curve, evaluate_cases  # noqa: E402
from lib.core.volume import load_volume  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def multipart_cases() -> list[LabelledCase]:
    """MS lesions of patient26 (when ../shared/data is there) and the sample abdomen CT's two kidneys."""
    cases = []
    ms = SHARED / "mr_ms_lesions"
    if ms.is_dir():
        cases += [replace(c, names={1: "lesions"}, source="ms_lesions_patient26")
                  for c in case_folders(ms, "flair.nii.gz", "label.nii.gz", "mr_ms_lesions")
                  if c.case_id == "patient26"]
    image = load_volume(ROOT / "sample-data" / "abdomen_ct.nii.gz")
    label = load_volume(ROOT / "sample-data" / "reference" / "abdomen_ct.nii.gz")
    kidneys = replace(label, array=np.isin(label.array, (2, 3)).astype(np.uint8))
    cases.append(LabelledCase("abdomen_ct", image, kidneys, {1: "kidneys"}, "kidneys_abdomen_ct"))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="shipped", help="comma-separated: base, shipped, adapter path; NAME=...")
    parser.add_argument("--inference", action="append", default=[], metavar="KEY=VALUE",
                        help="override a profile [inference] setting (repeatable)")
    parser.add_argument("--clicks", type=int, default=8)
    parser.add_argument("--slices", type=int, default=8, help="slices per object")
    parser.add_argument("--profile", default="lite_medsam")
    parser.add_argument("--out", type=Path, default=None, help="write every number as JSON here")
    args = parser.parse_args()
    try:
        inference = setting_pairs(args.inference)
    except ProfileError as e:
        sys.exit(f"--inference: {e}")
    cases = multipart_cases()
    settings = EvalSettings(max_clicks=args.clicks, max_slices_per_structure=args.slices, three_d=False, seed=0)
    report: dict = {"inference": inference, "clicks": args.clicks, "methods": {}}
    for item in args.methods.split(","):
        name, _, method = item.rpartition("=")
        name = name or method
        begin = time.perf_counter()
        records, _ = evaluate_cases(backend_for(method, args.profile, None, inference, None), cases, settings)
        kinds = {}
        for case in cases:
            rows = [r for r in records if r.case == case.case_id]
            pieces = [int(ndimage.label(case.label.array[:, :, r.slice] > 0)[1]) for r in rows]
            kinds[case.source] = {
                "curve": [round(x, 4) for x in dice_curve(rows)],
                "sessions": [{"slice": r.slice, "pieces": n, "pixels": r.pixels,
                              "dice": [round(d, 4) for d in r.click_dice]} for r, n in zip(rows, pieces, strict=True)],
            }
        report["methods"][name] = {"kinds": kinds, "seconds": round(time.perf_counter() - begin, 1)}
        for kind, k in kinds.items():
            print(f"{name} {kind}: mean Dice after 1..{args.clicks} clicks " + " ".join(f"{x:.3f}" for x in k["curve"]))
            for s in k["sessions"]:
                print(f"    slice {s['slice']} ({s['pieces']} pieces, {s['pixels']} px): "
                      + " ".join(f"{d:.2f}" for d in s["dice"]))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
