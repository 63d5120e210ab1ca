"""One active-learning round on real brain-tumour MR, base model against fine-tuned adapters.

    .venv/bin/python benchmarks/bench_training_brats.py [--epochs 10] [--slices 24]

Fine-tunes LiteMedSAM's decoder-side adapters and heads (the CPU default) on the FLAIR scans of
``../shared/data/mr_brats2015/train_*`` (whole tumour = label > 0) and reports, on the
``validation_*`` cases, box Dice and Dice after 1 and 3 simulated clicks (the product's deterministic
annotator, in the decoder's low-res frame), plus trainable parameters, wall time and peak memory.
BraTS is research-only data: it is read in place and never copied into the repository.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "apps" / "medsam_adapter"))

from lib.core.backbones import build_backbone  # noqa: E402
from lib.core.config import AdapterSettings, PreprocessSettings  # noqa: E402
from lib.core.model import AdaptedSam  # noqa: E402
from lib.core.training import (  # noqa: E402
    AdapterTrainer,
    LabelledVolume,
    TrainSettings,
    prepare_samples,
    run_summary,
)

BRATS = ROOT.parent / "shared" / "data" / "mr_brats2015"


def whole_tumour(case: Path, out: Path) -> LabelledVolume:
    img = nib.load(str(case / "label.nii.gz"))
    binary = (np.asarray(img.dataobj) > 0).astype(np.uint8)
    path = out / f"{case.name}_wt.nii.gz"
    nib.save(nib.Nifti1Image(binary, img.affine), str(path))
    return LabelledVolume(case / "flair.nii.gz", path, {1: "tumour"}, case.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--slices", type=int, default=24, help="labelled slices per volume")
    parser.add_argument("--lr", type=float, default=1e-4)
    args = parser.parse_args()
    if not BRATS.is_dir():
        sys.exit(f"{BRATS} not found")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tmp = Path(tempfile.mkdtemp(prefix="brats_"))
    train_vols = [whole_tumour(c, tmp) for c in sorted(BRATS.glob("train_*"))]
    val_vols = [whole_tumour(c, tmp) for c in sorted(BRATS.glob("validation_*"))]

    model = AdaptedSam(build_backbone("lite_medsam"), AdapterSettings(), labels=("tumour",)).to(device)
    model.freeze_all_but(["decoder_adapters", "output_upscaling", "hypernetworks", "iou_head", "mask_tokens",
                          "prompt_free_head"])
    settings = TrainSettings(max_epochs=args.epochs, max_slices_per_volume=args.slices, learning_rate=args.lr,
                             patience=max(3, args.epochs // 3))
    start = time.time()
    train = prepare_samples(model, train_vols, PreprocessSettings(), settings, device)
    val = prepare_samples(model, val_vols, PreprocessSettings(), settings, device)
    prepared = time.time() - start
    trainer = AdapterTrainer(model, settings, device)
    result = trainer.fit(train, val, feed_logits_before=False,
                         progress=lambda e: print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                                              for k, v in e.items()}), flush=True))
    report = {
        "data": {"train": [v.image_id for v in train_vols], "validation": [v.image_id for v in val_vols],
                 "train_slices": len(train), "train_objects": sum(len(s.objects) for s in train),
                 "validation_objects": min(sum(len(s.objects) for s in val), settings.max_val_objects)},
        "base": result.before,
        "fine_tuned": result.after,
        **run_summary(result, model, device, start, prepared),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
