"""Click sessions on training data, the way the server answers them: where click handling is tuned.

    .venv/bin/python benchmarks/trainpart_clicks.py [--cases selection|multipart|abdomen|fullres]
        [--methods shipped,NAME=PATH] [--inference KEY=VALUE] [--clicks 8] [--slices 3] [--embedding-store DIR]
        [--out results.json]

``--cases selection`` (default): the click trainer's checkpoint-selection objects of ``--data full``
(``scripts/train_click_adapter.py``: hippocampus, fetal-head, cardiac MR and AMOS CT cases set aside from
the train parts; never trained on). ``--cases multipart``: objects in several pieces on a slice, both in the
click adapter's training data — every MS lesion of ``../shared/data/mr_ms_lesions`` patient26 (the MS train
part; up to 11 lesions a slice) and both kidneys of the sample abdomen CT as one object. ``--cases
abdomen``: every structure of the sample abdomen CT and MR (TotalSegmentator references; organs, muscles,
bowel), also training data. ``--cases fullres``: whole 512 x 512 CT slices (the TotalSegmentator DICOM series,
the dcmqi 3-slice series), larger than the model's input. Sessions run through the same
``InteractiveSegmenter`` the infer tasks use (simulated annotator: a click at the most interior point of the
largest error, previous answer fed back;
``--slices`` slices per structure, seed 0). Prints each set's Dice after 1..N clicks and the mean of the set
means, the numbers the README's "chosen on train parts" tables report. The held-out sets (validation parts,
BraTS, DeepLesion) are for ``benchmarks/readme_results.sh``, run once on what this chose.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from evaluate import backend_for  # noqa: E402  (also puts the app on sys.path)
from train_click_adapter import data_volumes  # noqa: E402

from lib.core.config import ProfileError, setting_pairs  # noqa: E402
from lib.core.datasets import (  # noqa: E402
    LabelledCase,
    case_folders,
    dicom_series_with_seg,
    read_label_names,
    volume_pair,
)
from lib.core.evaluation import EvalSettings, dice_curve, evaluate_cases, records_as_dicts  # noqa: E402
from lib.core.training import as_volume  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def selection_cases() -> list[LabelledCase]:
    """The click trainer's checkpoint-selection objects of ``--data full``, as evaluation cases."""
    _, volumes = data_volumes("full", legacy_selection=False)
    cases = []
    for v in volumes:
        source, _, case_id = v.image_id.rpartition("/")
        cases.append(
            LabelledCase(case_id, as_volume(v.image), as_volume(v.label), dict(v.names), source or "sample-data")
        )
    return cases


def multipart_cases() -> list[LabelledCase]:
    """MS lesions of patient26 (when ../shared/data is there) and the sample abdomen CT's two kidneys, each
    as one object in several pieces."""
    cases = []
    ms = SHARED / "mr_ms_lesions"
    if ms.is_dir():
        cases += [replace(c, names={1: "lesions"}, source="ms_lesions_patient26")
                  for c in case_folders(ms, "flair.nii.gz", "label.nii.gz", "mr_ms_lesions")
                  if c.case_id == "patient26"]
    sample = ROOT / "sample-data"
    ct = volume_pair(sample / "abdomen_ct.nii.gz", sample / "reference" / "abdomen_ct.nii.gz", {1: "kidneys"},
                     "abdomen_ct", "kidneys_abdomen_ct")
    return [*cases, replace(ct, label=replace(ct.label, array=np.isin(ct.label.array, (2, 3)).astype(np.uint8)))]


def abdomen_cases() -> list[LabelledCase]:
    """Every structure of the sample abdomen CT and MR (TotalSegmentator references): large organs, muscles
    and bowel, several in pieces on a slice; both in the click adapter's training data."""
    reference = ROOT / "sample-data" / "reference"
    return [volume_pair(ROOT / "sample-data" / f"{name}.nii.gz", reference / f"{name}.nii.gz",
                        read_label_names(reference / f"{name}.labels.json"), name, f"structures_{name}")
            for name in ("abdomen_ct", "abdomen_mr")]


def fullres_cases() -> list[LabelledCase]:
    """Whole 512 x 512 CT slices, larger than the model's input (where zooming in on corrections can show
    detail the whole slice loses): the 20-slice TotalSegmentator DICOM series (liver, spleen, stomach, aorta;
    a reference, not ground truth) when ../shared/data is there, and the 3-slice dcmqi series (liver) of
    sample-data; neither is in the click adapter's training data or in the held-out sets."""
    dicom = ROOT / "sample-data" / "dicom"
    cases = [dicom_series_with_seg(dicom / "ct_dcmqi_3slice", dicom / "ct_dcmqi_seg" / "liver.dcm", "ct_dcmqi_3slice")]
    series = SHARED / "dicom" / "ct_totalseg_series"
    if series.is_dir():
        seg = next((SHARED / "dicom" / "ct_totalseg_seg").glob("*.dcm"))
        cases.insert(0, dicom_series_with_seg(series, seg, "ct_totalseg_series"))
    return cases


CASES = {"selection": selection_cases, "multipart": multipart_cases, "abdomen": abdomen_cases,
         "fullres": fullres_cases}


def set_curves(cases: list[LabelledCase], records) -> dict[str, dict]:
    """Per set (the case's source): sessions, box Dice and the mean Dice after each click."""
    source = {c.case_id: c.source for c in cases}
    out = {}
    for name in dict.fromkeys(source.values()):
        rows = [r for r in records if source[r.case] == name]
        if rows:
            out[name] = {
                "n": len(rows),
                "box": float(np.mean([r.box_dice for r in rows])),
                "curve": [round(x, 4) for x in dice_curve(rows)],
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="shipped", help="comma-separated: base, shipped, adapter path; NAME=...")
    parser.add_argument(
        "--inference",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a profile [inference] setting (repeatable)",
    )
    parser.add_argument("--cases", choices=tuple(CASES), default="selection",
                        help="the trainer's selection objects, objects in several pieces, every abdomen "
                             "structure, or whole 512 x 512 CT slices")
    parser.add_argument("--clicks", type=int, default=8)
    parser.add_argument("--slices", type=int, default=3, help="slices per structure")
    parser.add_argument("--first-click-depth", type=float, default=1.0,
                        help="below 1: the first click anywhere at least that fraction of the object's depth inside")
    parser.add_argument("--profile", default="lite_medsam")
    parser.add_argument("--embedding-store", type=Path, default=None, help="keep and reuse image embeddings here")
    parser.add_argument("--out", type=Path, default=None, help="write every number as JSON here")
    args = parser.parse_args()
    try:
        inference = setting_pairs(args.inference)
    except ProfileError as e:
        sys.exit(f"--inference: {e}")
    cases = CASES[args.cases]()
    if len({c.case_id for c in cases}) != len(cases):
        sys.exit("case ids are not unique across sets")
    try:
        settings = EvalSettings(max_clicks=args.clicks, max_slices_per_structure=args.slices, three_d=False, seed=0,
                                first_click_depth=args.first_click_depth)
    except ValueError as e:
        sys.exit(f"--first-click-depth: {e}")
    report = {"cases": args.cases, "inference": inference, "clicks": args.clicks,
              "first_click_depth": args.first_click_depth, "methods": {}}
    for item in args.methods.split(","):
        name, _, method = item.rpartition("=")
        name = name or method
        begin = time.perf_counter()
        records, _ = evaluate_cases(
            backend_for(method, args.profile, None, inference, args.embedding_store), cases, settings
        )
        sets = set_curves(cases, records)
        means = np.mean([s["curve"] for s in sets.values()], axis=0)
        report["methods"][name] = {
            "sets": sets,
            "set_means": [round(float(x), 4) for x in means],
            "seconds": round(time.perf_counter() - begin, 1),
            "sessions": records_as_dicts(records, [])["slices"],
        }
        print(f"{name}: set means after 1..{args.clicks} clicks " + " ".join(f"{x:.3f}" for x in means))
        for set_name, s in sets.items():
            print(f"  {set_name} ({s['n']} sessions, box {s['box']:.3f}): " + " ".join(f"{x:.3f}" for x in s["curve"]))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
