"""Train the prompt-free head shipped with the app for LiteMedSAM's profile labels (reproducible, CPU).

    nice -n 10 .venv/bin/python scripts/train_auto_head.py [--steps 1500] [--head decoder] [--out PATH]

The head (AutoSAM-style, on the frozen encoder's embedding) learns the profile's labels (spleen, liver,
kidney_right, kidney_left, stomach, aorta, spinal_cord) from the shippable labelled scans only:
``sample-data/`` (abdomen CT and MR with TotalSegmentator output as reference — model output, not
ground truth —, the spleen CT's manual label, two spinal-cord MR), ``mr_spine_spinegeneric/t1w``, the
AMOS/TotalSegmentator training PNG. Labels that annotate only some organs are trained with a marginal
loss (lib/core/head_training.py). Held out: the AMOS test PNG (liver, aorta; dataset labels),
``mr_spine_sct/t1`` (manual cord) and two CT patients the head never sees, as DICOM series with a SEG:
``dicom/ct_totalseg_series`` (512x512, TotalSegmentator's liver, spleen, stomach and aorta) and
``dicom/ct_dcmqi_3slice`` (manual liver); ``--train-on-series`` trains on the first of them instead. The
held-out cases are reported, never used to choose: the head of the last step is written (the shipped
file, from commit 08f8da6's version of this script, was the best of steps 200-800 on the AMOS test PNG
and the cord). ``--views N`` adds N training views of every case (lib/core/augment.py: zoomed field of
view, CT values jittered). Embeddings are computed once (frozen encoder, base model: the shipped click
adapter leaves the encoder unchanged) and cached in ``--cache`` under a key of the data and views.

Writes the head alone (``AdapterCheckpoint.head_from_model``, atomically) and a JSON record (data,
seed, settings, per-label Dice on the training data and held out, wall time, memory) next to it.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "apps" / "medsam_adapter"
sys.path.insert(0, str(APP))

from lib.core.atomic import atomic_write  # noqa: E402
from lib.core.augment import training_views  # noqa: E402
from lib.core.checkpoint import AdapterCheckpoint  # noqa: E402
from lib.core.config import load_profile  # noqa: E402
from lib.core.datasets import LabelledCase, dicom_series_with_seg, load_dataset, png_mask_set, volume_pair  # noqa: E402
from lib.core.head_training import HeadSample, fit_head, head_dice  # noqa: E402
from lib.core.model import AdaptedSam  # noqa: E402
from lib.core.training import LabelledVolume, TrainSettings, prepare_samples  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
CORD = {1: "spinal_cord"}


def cases(train_on_series: bool = False) -> tuple[list[tuple[LabelledCase, bool]], list[tuple[LabelledCase, bool]]]:
    """(train, held-out) as (case, fully_labelled) pairs. Fully labelled: every profile label that is
    in the image is in its label (TotalSegmentator output; spinal-cord MR crops show no abdominal organ)."""
    train: list[tuple[LabelledCase, bool]] = []
    for case in load_dataset(ROOT / "sample-data", ROOT / "sample-data" / "reference"):
        if case.case_id.startswith("spine_"):
            train.append((replace(case, names=CORD), True))
        elif case.case_id == "spleen_ct":
            train.append((replace(case, names={1: "spleen"}), False))
        else:
            train.append((case, True))
    held: list[tuple[LabelledCase, bool]] = []
    if SHARED.is_dir():
        sg = SHARED / "mr_spine_spinegeneric"
        train.append((volume_pair(sg / "t1w.nii.gz", sg / "t1w_label.nii.gz", CORD, "spinegeneric_t1w", "sg"), True))
        amos = SHARED / "ct2d_amos_totalseg"
        train += [(c, False) for c in png_mask_set(amos / "image2label_train.json", "ct2d_amos_totalseg")]
        sct = SHARED / "mr_spine_sct"
        held.append((volume_pair(sct / "t1.nii.gz", sct / "t1_label.nii.gz", CORD, "sct_t1", "sct"), True))
        held += [(c, False) for c in png_mask_set(amos / "label2image_test.json", "ct2d_amos_totalseg")]
        dicom = SHARED / "dicom"
        series = dicom_series_with_seg(dicom / "ct_totalseg_series", next((dicom / "ct_totalseg_seg").glob("*.dcm")),
                                       "dicom")
        (train if train_on_series else held).append((series, False))
        held.append((dicom_series_with_seg(dicom / "ct_dcmqi_3slice", dicom / "ct_dcmqi_seg" / "liver.dcm", "dicom"),
                     False))
    return train, held


def head_samples(model: AdaptedSam, pairs: list[tuple[LabelledCase, bool]], profile, settings: TrainSettings,
                 device: torch.device) -> list[HeadSample]:
    """Embeddings (fp16) and head targets of the labelled slices that show any profile label."""
    out: list[HeadSample] = []
    index = {name: i + 1 for i, name in enumerate(model.labels)}
    for case, full in pairs:
        known = {v: n for v, n in case.names.items() if n in index}
        if not known:
            continue
        vol = LabelledVolume(case.image, case.label, known, f"{case.source}/{case.case_id}")
        annotated = np.zeros(len(model.labels) + 1, dtype=bool)
        annotated[0] = True
        if full:
            annotated[:] = True
        else:
            annotated[[index[n] for n in known.values()]] = True
        for s in prepare_samples(model, [vol], profile.preprocessing, settings, device):
            if s.head_target is not None:
                out.append(HeadSample(s.source, s.k, s.embedding.half().cpu(), s.head_target, annotated))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--validate-every", type=int, default=250, help="steps between held-out checks")
    parser.add_argument("--head", default="decoder", help="decoder | unet | linear")
    parser.add_argument("--max-slices", type=int, default=30, help="labelled slices per volume (evenly spaced)")
    parser.add_argument("--views", type=int, default=0, help="extra training views of every case (augment.py)")
    parser.add_argument("--train-on-series", action="store_true",
                        help="train on the TotalSegmentator CT series instead of holding it out")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/medsam_auto_head_embeddings.pt"))
    parser.add_argument("--out", type=Path, default=APP / "adapters" / "lite_medsam_auto_head.pt")
    args = parser.parse_args()
    started = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = load_profile(APP / "configs" / "lite_medsam.toml")
    profile = replace(base, adapters=replace(base.adapters, head=args.head), adapter_checkpoint=None)
    model = AdaptedSam.from_profile(profile).to(device)
    model.freeze_all_but(["prompt_free_head"])
    settings = TrainSettings(max_slices_per_volume=args.max_slices, min_object_pixels=4, seed=args.seed)
    train_pairs, held_pairs = cases(args.train_on_series)
    rng = np.random.default_rng(args.seed)
    views = [(v, full) for c, full in train_pairs for v in training_views(c, args.views, rng)]
    key = json.dumps([[f"{c.source}/{c.case_id}" for c, _ in pairs] for pairs in (train_pairs, views, held_pairs)]
                     + [args.max_slices, args.seed])
    t0 = time.time()
    cached = torch.load(args.cache, weights_only=False) if args.cache.is_file() else {}
    if cached.get("key") == key:
        train, held = cached["train"], cached["held"]
        print(f"embeddings from {args.cache}", flush=True)
    else:
        train = head_samples(model, train_pairs + views, profile, settings, device)
        held = head_samples(model, held_pairs, profile, settings, device)
        with atomic_write(args.cache) as fh:
            torch.save({"key": key, "train": train, "held": held}, fh)
    embedding_seconds = time.time() - t0
    print(f"{len(train)} training slices, {len(held)} held-out slices; embeddings {embedding_seconds:.0f} s",
          flush=True)
    counts = model.parameter_counts()

    def log(entry: dict) -> None:
        print(json.dumps(entry), flush=True)

    summary = fit_head(model, train, args.steps, device, args.batch, args.lr, args.seed,
                       validate=lambda: head_dice(model, held, device) if held else {}, every=args.validate_every,
                       log=log, keep_best=False)
    by_source: dict[str, dict] = {}
    for source in sorted({s.source for s in train + held if "@" not in s.source}):  # not the training views
        group = [s for s in train + held if s.source == source]
        by_source[source] = {"slices": len(group), **head_dice(model, group, device)}
    record = {
        "command": "python scripts/train_auto_head.py " + " ".join(sys.argv[1:]),
        "what": "prompt-free head alone, loaded on top of the served adapters when they have no trained head",
        "head": args.head,
        "labels": list(model.labels),
        "train_cases": [f"{c.source}/{c.case_id}" + ("" if full else " (partial labels: marginal loss)")
                        for c, full in train_pairs],
        "held_out_cases": [f"{c.source}/{c.case_id}" for c, _ in held_pairs],
        "reference_note": "abdomen CT/MR labels are TotalSegmentator output: their Dice is agreement with "
                          "TotalSegmentator, not accuracy; spleen_ct, spine and AMOS PNG labels are manual/dataset",
        "training_views_per_case": args.views,
        "train_slices": len(train),
        "held_out_slices": len(held),
        "seed": args.seed,
        "settings": {"steps": args.steps, "validate_every": args.validate_every, "batch": args.batch,
                     "lr": args.lr, "schedule": "cosine, AdamW wd 0.01",
                     "loss": "marginal CE + soft Dice over annotated labels", **asdict(settings)},
        "trainable_parameters": counts["prompt_free_head"],
        "dice_train_data": {k: v for k, v in by_source.items() if any(s.source == k for s in train)},
        "dice_held_out": {k: v for k, v in by_source.items() if any(s.source == k for s in held)},
        "held_out_pooled": head_dice(model, held, device) if held else {},
        "history": summary["history"],
        "best_step": summary["best_step"],
        "embedding_seconds": round(embedding_seconds, 1),
        "training_seconds": summary["seconds"],
        "wall_seconds": round(time.time() - started, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    metrics = {"prompt_free_head_trained": True, "head_record": {k: record[k] for k in
               ("head", "train_cases", "held_out_cases", "held_out_pooled", "seed", "created")}}
    AdapterCheckpoint.head_from_model(model, metrics).save(args.out)
    with atomic_write(args.out.with_suffix(".json"), mode="w") as fh:
        json.dump(record, fh, indent=2)
        fh.write("\n")
    print(json.dumps({"held_out": record["dice_held_out"], "train": record["dice_train_data"]}, indent=2))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
