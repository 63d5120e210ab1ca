"""Train the click adapter shipped with the app for the bundled LiteMedSAM (reproducible, CPU).

    .venv/bin/python scripts/train_click_adapter.py [--epochs 24] [--steps 120] [--out PATH]

By default trains only the decoder-side adapters and heads (mask decoder adapters, output upscaling,
hypernetworks, IoU head, mask tokens) with the product's own trainer and simulated annotator: single
clicks, click sequences into the largest error with the previous logits fed back, boxes, box plus
clicks. Opt-in variants (measured in the README): a longer click horizon (``--click-rounds``),
size-balanced object sampling (``--balance-sizes``), a cosine rate decay (``--cosine``), three masks for a
lone click (``--multimask``), more negative-click rounds (``--negative-share``), more lone-click rounds
(``--lone-click-share``), gradient clipping
(``--grad-clip``), a warm start from earlier adapters (``--start-from``), the image encoder's adapters
trained too (``--encoder-adapters``; image embeddings are then recomputed at every step, otherwise
once), or only its last stages' adapters (``--encoder-front-stages N``: the first N stages run once per
slice, their output kept, in ``--embedding-store`` too; LiteMedSAM's last stage trains at about a quarter
of a whole encoder step's cost on a CPU).
Data: the shippable labelled scans only (``sample-data/`` and the shippable folders of
``../shared/data``); ``mr_brats2015`` and ``ct_lesion_deeplesion`` are never used, they are the held-out
evaluation. Writes the checkpoint atomically plus a JSON record (data list, seed, settings, validation
numbers, wall time) next to it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "apps" / "medsam_adapter"
sys.path.insert(0, str(APP))

from lib.core.cache import StoredEmbeddingCache  # noqa: E402
from lib.core.checkpoint import AdapterCheckpoint  # noqa: E402
from lib.core.config import load_profile  # noqa: E402
from lib.core.datasets import LabelledCase, case_folders, load_dataset, png_mask_set, volume_pair  # noqa: E402
from lib.core.encoder_stages import EncoderSplitError, encode_front, front_prefixes  # noqa: E402
from lib.core.model import AdaptedSam  # noqa: E402
from lib.core.sample_bank import load_samples, save_samples  # noqa: E402
from lib.core.served_session import ServedAnswers  # noqa: E402
from lib.core.training import (  # noqa: E402
    AdapterTrainer,
    LabelledVolume,
    TrainSettings,
    prepare_samples,
    run_summary,
)

SHARED = ROOT.parent / "shared" / "data"
DECODER_PARTS = ["decoder_adapters", "output_upscaling", "hypernetworks", "iou_head", "mask_tokens"]
HELD_OUT = ("mr_brats2015", "ct_lesion_deeplesion")


# the train parts of the kinds added in round 3 (ultrasound, cardiac MR, brain MR structures and lesions):
# (set, cases used for training, cases kept aside for checkpoint selection, labelled slices per case);
# their validation parts are never used here: they are the held-out evaluation
BROAD_SETS = {
    "mr_hippocampus_msd": (36, 4, 3),
    "us_fetal_head_hc18": (24, 6, 1),
    "cmr_lv_sunnybrook": (24, 6, 1),
    "mr_ms_lesions": (1, 0, 8),
}
# the same kinds at the whole of their train parts (a GPU round, or a long CPU one)
FULL_SETS = {
    "mr_hippocampus_msd": (144, 16, 4),
    "us_fetal_head_hc18": (216, 24, 1),
    "cmr_lv_sunnybrook": (48, 12, 1),
    "mr_ms_lesions": (1, 0, 24),
}


def broad_training_data(sets: dict[str, tuple[int, int, int]]) -> tuple[list[LabelledVolume], list[LabelledVolume]]:
    """(train, selection) volumes from the train parts of ``sets`` (seeded choice of cases)."""
    rng = np.random.default_rng(0)
    train: list[LabelledVolume] = []
    select: list[LabelledVolume] = []
    for name, (n_train, n_select, per_case) in sets.items():
        folder = SHARED / name
        if name == "mr_hippocampus_msd":
            cases = [c for c in case_folders(folder, "image.nii.gz", "label.nii.gz", name)
                     if c.case_id.startswith("train_")]
        elif name == "mr_ms_lesions":
            cases = [c for c in case_folders(folder, "flair.nii.gz", "label.nii.gz", name) if c.case_id == "patient26"]
        else:
            cases = png_mask_set(folder / "image2label_train.json", name)
        order = rng.permutation(len(cases))
        volumes = [LabelledVolume(c.image, c.label, c.names, f"{name}/{c.case_id}", per_case) for c in
                   (cases[i] for i in order)]
        train += volumes[:n_train]
        select += volumes[n_train : n_train + n_select]
    return train, select


def training_data(legacy_selection: bool = False) -> tuple[list[LabelledCase], list[LabelledCase]]:
    """(train, checkpoint selection) cases; the shared folders are used when present (they are in CI).
    Selection uses train parts only (a third of the AMOS train slices): the validation parts are the
    held-out evaluation. ``legacy_selection``: rounds 2-3's choice (the sct t1 volume and the AMOS test
    slices, which the README's held-out tables also report), kept to reproduce the shipped adapters."""
    train = load_dataset(ROOT / "sample-data", ROOT / "sample-data" / "reference")
    val: list[LabelledCase] = []
    if SHARED.is_dir():
        sct = SHARED / "mr_spine_sct"
        train.append(volume_pair(sct / "t2s.nii.gz", sct / "t2s_graymatter_label.nii.gz", {}, "sct_t2s_gm", "sct"))
        sg = SHARED / "mr_spine_spinegeneric"
        train.append(volume_pair(sg / "t1w.nii.gz", sg / "t1w_label.nii.gz", {}, "spinegeneric_t1w", "sg"))
        amos = png_mask_set(SHARED / "ct2d_amos_totalseg" / "image2label_train.json", "ct2d_amos_totalseg")
        if legacy_selection:
            train += amos
            val.append(volume_pair(sct / "t1.nii.gz", sct / "t1_label.nii.gz", {}, "sct_t1", "sct"))
            val += png_mask_set(SHARED / "ct2d_amos_totalseg" / "label2image_test.json", "ct2d_amos_totalseg")
            return train, val
        order = np.random.default_rng(0).permutation(len(amos))
        n_select = max(1, len(amos) // 3)
        val += [amos[i] for i in order[:n_select]]  # checkpoint selection: train-part CT slices
        train += [amos[i] for i in order[n_select:]]
    else:  # repository only: validate on one sample volume
        val = [train.pop(next(i for i, c in enumerate(train) if c.case_id == "spine_t2_sct"))]
    return train, val


def as_volumes(cases: list[LabelledCase]) -> list[LabelledVolume]:
    return [LabelledVolume(c.image, c.label, c.names, f"{c.source}/{c.case_id}") for c in cases]


def data_volumes(data: str, legacy_selection: bool) -> tuple[list[LabelledVolume], list[LabelledVolume]]:
    """(train, checkpoint selection) volumes of ``--data``."""
    train_cases, val_cases = training_data(legacy_selection)
    train, val = as_volumes(train_cases), as_volumes(val_cases)
    if data in ("broad", "full"):
        if not SHARED.is_dir():
            sys.exit(f"--data {data} needs {SHARED}")
        extra_train, extra_select = broad_training_data(BROAD_SETS if data == "broad" else FULL_SETS)
        train += extra_train
        val += extra_select
    return train, val


def write_bank(folder: Path, train: list, val: list, record: dict) -> None:
    """The prepared samples as two sample banks (train, selection) plus the cases they came from."""
    save_samples(train, folder / "train.npz.xz")
    save_samples(val, folder / "selection.npz.xz")
    (folder / "cases.json").write_text(json.dumps(record, indent=2) + "\n")
    size = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
    print(f"wrote {len(train)} train and {len(val)} selection slices to {folder} ({size:.1f} MB)")


def read_bank(
    folder: Path, model: AdaptedSam, device: torch.device, encoder_trains: bool, front_stages: int = 0
) -> tuple[list, list, dict]:
    """The banked samples; their embeddings (or their encoder front's outputs, when only the encoder's back
    trains) are computed once here unless the whole encoder trains."""
    parts = [load_samples(folder / name) for name in ("train.npz.xz", "selection.npz.xz")]
    for sample in (s for part in parts for s in part):
        x = sample.model_input.to(device)
        if encoder_trains and not front_stages:
            sample.model_input = x
            continue
        with torch.inference_mode():
            if encoder_trains:
                sample.encoder_front = encode_front(model, x, front_stages).clone()
            else:
                sample.embedding = model.encode(x).clone()
        sample.model_input = None
    return parts[0], parts[1], json.loads((folder / "cases.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--steps", type=int, default=120, help="steps per epoch")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--click-rounds", type=int, default=5, help="clicks after the first prompt")
    parser.add_argument("--patience", type=int, default=6)
    parser.add_argument("--val-clicks", type=int, default=3, help="checkpoint score: box Dice and Dice after N clicks")
    parser.add_argument("--balance-sizes", action="store_true", help="draw objects evenly over size classes")
    parser.add_argument("--cosine", action="store_true", help="cosine decay of the learning rate")
    parser.add_argument("--multimask", action="store_true",
                        help="three masks for a lone click, best one trained (measured: worse held-out 1-click Dice)")
    parser.add_argument("--negative-share", type=float, default=0.0,
                        help="how often the trained round is one ending in a negative click (0..1)")
    parser.add_argument("--lone-click-share", type=float, default=0.0,
                        help="how often a session started by a click trains its first answer, the lone click (0..1)")
    parser.add_argument("--grad-clip", type=float, default=0.0, help="clip the gradient norm (0: off)")
    parser.add_argument("--start-from", type=Path, default=None,
                        help="continue from these adapters (as an active-learning round does), not the base")
    parser.add_argument("--encoder-adapters", action="store_true",
                        help="train the image encoder's adapters too (slow on CPU: embeddings every step)")
    parser.add_argument("--encoder-front-stages", type=int, default=0,
                        help="with --encoder-adapters: the encoder's first N stages run once per slice and only "
                             "the later stages' adapters train (lite_medsam: 3 keeps the last of 4 stages to train)")
    parser.add_argument("--data", choices=("organs", "broad", "full"), default="organs",
                        help="organs: CT/MR organs and spinal cord (round 2); broad: plus part of the train parts "
                             "of hippocampus MR, fetal-head ultrasound, cardiac MR and MS lesions; full: all of them")
    parser.add_argument("--save-samples", type=Path,
                        help="prepare the data's samples (their slices), write them to this sample bank, stop")
    parser.add_argument("--samples", type=Path,
                        help="train from this sample bank (written by --save-samples) instead of reading the data")
    parser.add_argument("--embedding-store", type=Path,
                        help="keep image embeddings in this folder (torch encoder; scripts/evaluate.py reads them "
                             "with --inference encoder_runtime='\"torch\"')")
    parser.add_argument("--served-sessions", action="store_true",
                        help="the simulated annotator sees what inference shows: boxes alone answered by the bare "
                             "model, a lone click at its scale, local corrections (boxes are then not trained)")
    parser.add_argument("--legacy-selection", action="store_true",
                        help="checkpoint selection as in rounds 2-3 (sct t1, AMOS test slices: sets the README also "
                             "reports as held out); only to reproduce the shipped adapters")
    parser.add_argument("--lone-click-adapter", action="store_true",
                        help="adapters for lone clicks only (the profile's lone_click_checkpoint): every session is "
                             "one click, its answer trained; the best epoch by the click-alone Dice")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: adapters/lite_medsam_clicks.pt (lite_medsam_lone_click.pt with "
                             "--lone-click-adapter)")
    args = parser.parse_args()
    if args.out is None:
        name = "lite_medsam_lone_click.pt" if args.lone_click_adapter else "lite_medsam_clicks.pt"
        args.out = APP / "adapters" / name
    if args.encoder_front_stages and not args.encoder_adapters:
        parser.error("--encoder-front-stages needs --encoder-adapters")
    if args.served_sessions and (args.lone_click_share or args.lone_click_adapter):
        parser.error("--lone-click-share and --lone-click-adapter train the lone click's own answer; with "
                     "--served-sessions it is not trained")
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    profile = replace(load_profile(APP / "configs" / "lite_medsam.toml"), adapter_checkpoint=None)
    model = AdaptedSam.from_profile(profile).to(device)
    served = None
    if args.served_sessions:  # the bare base model answers boxes alone and the lone click's scale candidates
        served = ServedAnswers(AdaptedSam.from_profile(profile).to(device), profile.inference)
    part: str | tuple[str, ...] = "image_encoder."  # what the stored embeddings depend on
    if args.encoder_front_stages:
        try:
            part = front_prefixes(model, args.encoder_front_stages)  # the kept fronts: the front's adapters only
        except EncoderSplitError as err:
            parser.error(str(err))
    encoder_key = "base"  # the embeddings' (or encoder fronts') name in --embedding-store
    if args.start_from is not None:
        start_from = AdapterCheckpoint.load(args.start_from)
        if start_from.changes_encoder(model.adaptable_state(), part):
            encoder_key = f"enc-{start_from.fingerprint(part)}"  # its encoder adapters change them
        start_from.apply_to(model)
    parts = DECODER_PARTS + (["encoder_adapters"] if args.encoder_adapters else [])
    model.freeze_all_but(parts)
    settings = TrainSettings(
        max_epochs=args.epochs, steps_per_epoch=args.steps, batch_size=args.batch, learning_rate=args.lr,
        click_rounds=args.click_rounds, mask_only_rounds=1, box_probability=0.35, box_jitter=5, seed=args.seed,
        patience=args.patience, max_slices_per_volume=30, min_object_pixels=12, max_val_objects=96,
        train_prompt_free_head=False, multimask_single_click=args.multimask, balance_object_sizes=args.balance_sizes,
        val_clicks=args.val_clicks, cosine_schedule=args.cosine, negative_click_share=args.negative_share,
        lone_click_share=args.lone_click_share, grad_clip_norm=args.grad_clip,
        train_encoder_adapters=args.encoder_adapters, encoder_front_stages=args.encoder_front_stages,
    )
    if args.lone_click_adapter:  # one click per session, its answer trained, chosen by the click-alone Dice
        settings = replace(settings, click_rounds=0, mask_only_rounds=0, box_probability=0.0, lone_click_share=1.0,
                           val_clicks=1, max_val_objects=200, selection_metric="click1_dice")
    start = time.time()
    if args.samples is not None:
        train, val, cases = read_bank(args.samples, model, device, args.encoder_adapters, args.encoder_front_stages)
    else:
        train_volumes, val_volumes = data_volumes(args.data, args.legacy_selection)
        cases = {"train_cases": [v.image_id for v in train_volumes],
                 "validation_cases": [v.image_id for v in val_volumes]}
        bank = args.save_samples is not None
        store = None
        if args.embedding_store is not None and not bank and (args.encoder_front_stages or not args.encoder_adapters):
            # the trainer encodes with torch: the folder evaluate.py uses with --inference encoder_runtime='"torch"'
            folder = args.embedding_store / profile.name / "torch"
            store = StoredEmbeddingCache(profile.inference.embedding_cache_mb, folder)
        fingerprint = f"{profile.name}:{encoder_key}"  # the encoder's embeddings, as inference keys them
        # a bank keeps the slices themselves: nothing is encoded (as when the encoder trains)
        prep = replace(settings, train_encoder_adapters=True, encoder_front_stages=0) if bank else settings
        train = prepare_samples(model, train_volumes, profile.preprocessing, prep, device, store, fingerprint, bank)
        val = prepare_samples(model, val_volumes, profile.preprocessing, prep, device, store, fingerprint, bank)
        if bank:
            write_bank(args.save_samples, train, val, {**cases, "command": " ".join(sys.argv)})
            return
    prepared = time.time() - start
    print(f"{len(train)} training slices ({sum(len(s.objects) for s in train)} objects), {len(val)} validation "
          f"slices; embeddings in {prepared:.0f} s", flush=True)
    trainer = AdapterTrainer(model, settings, device, served)
    common = {
        "command": "python scripts/train_click_adapter.py " + " ".join(sys.argv[1:]),
        **{k: cases[k] for k in ("train_cases", "validation_cases")},
        "held_out_never_used": list(HELD_OUT),
        "train_slices": len(train),
        "train_objects": sum(len(s.objects) for s in train),
        "trained_parts": parts,
        "settings": asdict(settings),
        "served_sessions": args.served_sessions,
        "lone_click_adapter": args.lone_click_adapter,
    }
    history: list[dict] = []

    def on_epoch(entry: dict) -> None:
        """Print the epoch; a new best is written at once (a stopped run keeps its best epoch)."""
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in entry.items()}), flush=True)
        history.append(entry)
        if entry["best_epoch"] == entry["epoch"]:
            # the entry is the epoch's validation metrics plus the trainer's progress bookkeeping
            after = {k: v for k, v in entry.items() if k not in ("epoch", "loss", "total_epochs", "best_metric",
                                                                  "best_epoch")}
            save(args.out, model, {**common, "finished": False, "validation_after": after, "history": history},
                 args.start_from)

    result = trainer.fit(train, val, feed_logits_before=args.start_from is not None,  # base: no mask prompts
                         progress=on_epoch)
    if result.best_state is None:
        sys.exit("no epoch beat the starting model on validation; nothing written")
    with torch.no_grad():
        own = dict(model.named_parameters())
        for name, tensor in result.best_state.items():
            own[name].copy_(tensor)
    record = {
        **common,
        "finished": True,
        "validation_before": result.before,
        "validation_after": result.after,
        "history": result.history,
        **run_summary(result, model, device, start, prepared),
    }
    save(args.out, model, record, args.start_from)
    print(json.dumps({k: record[k] for k in ("validation_before", "validation_after", "best_epoch", "wall_seconds")},
                     indent=2))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) and {args.out.with_suffix('.json')}")


def save(out: Path, model: AdaptedSam, record: dict, started_from: Path | None) -> None:
    """The adapters (atomically, fingerprinted to the base) and their JSON record next to them."""
    metrics = {
        "trained_with_mask_prompts": True,
        "trained_multimask_single_click": record["settings"]["multimask_single_click"],
        "prompt_free_head_trained": False,
        "before": record.get("validation_before", {}),
        "after": record["validation_after"],
        "images": record["train_cases"],
        "validation_images": record["validation_cases"],
        "settings": record["settings"],
        "started_from": str(started_from) if started_from else "base",
    }
    AdapterCheckpoint.from_model(model, 0, metrics).save(out)
    record_path = out.with_suffix(".json")
    tmp = record_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(record_path)


if __name__ == "__main__":
    main()
