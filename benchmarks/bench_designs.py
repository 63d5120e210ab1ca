"""Adapter designs and prompt-free heads compared as the seed papers compare them (one round each).

    nice -n 10 .venv/bin/python benchmarks/bench_designs.py                      # the full table (slow)
    nice -n 10 .venv/bin/python benchmarks/bench_designs.py --datasets hippocampus --volumes 1 \\
        --epochs 1 --steps 4 --slices 4 --val-cases 2                            # a small configuration
    python3 benchmarks/bench_designs.py --jobs 8 --data DIR --out designs.json     # on a GPU machine
    .venv/bin/python benchmarks/bench_designs.py --step-cost --designs msa,depth    # one step, checkpointing off/on
    .venv/bin/python benchmarks/bench_designs.py --step-cost --encoder-precision bf16  # fp32 and bf16 autocast
    .venv/bin/python benchmarks/bench_designs.py --step-cost --designs msa --front-stages 0,2,3  # the front kept
    .venv/bin/python benchmarks/bench_designs.py --encode-cost --designs msa,depth  # a new slice's encoder cost

For each design (``msa``, ``samus``, ``depth``; with the default ``decoder`` head) and each prompt-free head
(``decoder``, ``unet``, ``linear``; with the ``msa`` design), and for 1 and 4 labelled training volumes
(AutoSAM's label-efficiency question), one training round of LiteMedSAM from fresh adapters with the
product's trainer and simulated annotator, then on held-back validation volumes: box Dice, Dice after
1 and 3 clicks, prompt-free head Dice (the decoder's low-res frame). Also: trainable parameters, the
round's wall time (embeddings + training) and its peak resident memory — each configuration runs in its
own process so its peak is its own.

Data (read in place, never copied): BraTS 2015 FLAIR whole tumour (``mr_brats2015``: 2 train cases, so
"4 volumes" uses both; validation on ``validation_*``), MSD hippocampus (``train_*`` / ``validation_*``,
anterior + posterior). ``--encoder-adapters`` (default on) trains the encoder-side parts too: without it
every design trains the same decoder-side parts on the same cached embeddings (the CPU default), so
the designs cannot differ. On BraTS (``--three-d``, default): 3D Dice from one tight box on each validation
volume's middle tumour slice, propagated by the product's inference (the evaluation suite's protocol, in
process, torch encoder) with the round's adapters published as a served version would be.
Numbers taken on a shared CPU are noisy: rerun on a quiet machine for the README table. ``--jobs N`` runs N
rounds at once (each in its own process; on a GPU the CUDA peak is per process, the times overlap).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "apps" / "medsam_adapter"
sys.path.insert(0, str(APP))

from lib.core.cache import StoredEmbeddingCache  # noqa: E402
from lib.core.config import load_profile  # noqa: E402
from lib.core.datasets import volume_pair  # noqa: E402
from lib.core.engine import InteractiveSegmenter, publish_adapters  # noqa: E402
from lib.core.eval_backends import InProcessBackend  # noqa: E402
from lib.core.evaluation import EvalSettings, evaluate_cases  # noqa: E402
from lib.core.model import AdaptedSam  # noqa: E402
from lib.core.training import (  # noqa: E402
    CHECKPOINTING_MODES,
    ENCODER_PRECISIONS,
    AdapterTrainer,
    LabelledVolume,
    TrainSettings,
    prepare_samples,
)

DATA = ROOT.parent / "shared" / "data"
DESIGNS = ("msa", "samus", "depth")
HEADS = ("decoder", "unet", "linear")


def brats(data: Path, split: str, tmp: Path) -> list[LabelledVolume]:
    out = []
    for case in sorted((data / "mr_brats2015").glob(f"{split}_*")):
        img = nib.load(str(case / "label.nii.gz"))
        path = tmp / f"{case.name}_wt.nii.gz"
        if not path.exists():  # written then renamed: rounds run at once may race for it
            part = tmp / f"{case.name}_wt.{os.getpid()}.nii.gz"
            nib.save(nib.Nifti1Image((np.asarray(img.dataobj) > 0).astype(np.uint8), img.affine), str(part))
            os.replace(part, path)
        out.append(LabelledVolume(case / "flair.nii.gz", path, {1: "tumour"}, case.name))
    return out


def hippocampus(data: Path, split: str, tmp: Path) -> list[LabelledVolume]:
    names = {1: "hippocampus_anterior", 2: "hippocampus_posterior"}
    return [
        LabelledVolume(c / "image.nii.gz", c / "label.nii.gz", names, c.name)
        for c in sorted((data / "mr_hippocampus_msd").glob(f"{split}_hippocampus_*"))
    ]


DATASETS = {"brats": (brats, ("tumour",)), "hippocampus": (hippocampus, ("hippocampus_anterior",
                                                                        "hippocampus_posterior"))}


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak so far: CUDA memory allocated on a GPU, resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def result_of(cmd: list[str]) -> tuple[dict | None, str]:
    """Run ``cmd`` (this script with an internal option) and parse its ``RESULT`` line: (result, stderr)."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    return (json.loads(line[len("RESULT "):]) if line else None), proc.stderr


def three_d_dice(model: AdaptedSam, profile, volumes: list[LabelledVolume], device: torch.device) -> float:
    """Mean 3D Dice over ``volumes`` and their structures: the evaluation suite's one tight box on the middle
    labelled slice, propagated by the served inference path with ``model``'s adapters (published to a
    scratch folder)."""
    profile = replace(profile, inference=replace(profile.inference, encoder_runtime="torch"))
    cases = [volume_pair(Path(v.image), Path(v.label), v.names, v.image_id) for v in volumes]
    with tempfile.TemporaryDirectory(prefix="bench_designs_3d_") as folder:
        publish_adapters(model, Path(folder), {})
        backend = InProcessBackend(InteractiveSegmenter(profile, adapter_dir=Path(folder), device=str(device)))
        # no slice sessions (the round's validation measured those): the 3D propagation only
        _, records = evaluate_cases(backend, cases, EvalSettings(max_slices_per_structure=0))
    return round(float(np.mean([r.dice for r in records])), 4) if records else float("nan")


def one_round(args: argparse.Namespace) -> dict:
    """One configuration in this process: build, train one round, validate; numbers as a dict."""
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tmp = Path(tempfile.gettempdir()) / "bench_designs"
    tmp.mkdir(exist_ok=True)
    load, labels = DATASETS[args.dataset]
    train_vols = load(args.data, "train", tmp)[: args.n]
    val_vols = load(args.data, "validation", tmp)[: args.val_cases]
    base = load_profile(APP / "configs" / "lite_medsam.toml")
    profile = replace(base, labels=labels, adapters=replace(base.adapters, design=args.design, head=args.head))
    model = AdaptedSam.from_profile(profile).to(device)
    parts = ["decoder_adapters", "output_upscaling", "hypernetworks", "iou_head", "mask_tokens", "prompt_free_head"]
    if args.encoder_adapters:
        parts.append("encoder_adapters")
    model.freeze_all_but(parts)
    settings = TrainSettings(
        max_epochs=args.epochs, steps_per_epoch=args.steps, batch_size=args.batch, learning_rate=args.lr,
        max_slices_per_volume=args.slices, seed=args.seed, train_encoder_adapters=args.encoder_adapters,
        patience=args.epochs, encoder_checkpointing=args.encoder_checkpointing,
        encoder_precision=args.encoder_precision,
    )
    # a frozen, untrained encoder gives the base model's embeddings: kept on disk across configurations
    store = None if args.encoder_adapters or args.embedding_store is None else StoredEmbeddingCache(
        4096, args.embedding_store)
    fingerprint = f"{base.name}:base"  # as scripts/train_click_adapter.py and scripts/evaluate.py key them
    start = time.time()
    train = prepare_samples(model, train_vols, profile.preprocessing, settings, device, store, fingerprint)
    val_settings = replace(settings, train_encoder_adapters=False)
    prepared = time.time() - start
    trainer = AdapterTrainer(model, settings, device)
    result = trainer.fit(train, [], feed_logits_before=False) if args.epochs > 0 else None  # 0: the base model
    if result is not None and result.best_state is not None:
        with torch.no_grad():
            own = dict(model.named_parameters())
            for name, tensor in result.best_state.items():
                own[name].copy_(tensor)
    round_seconds = time.time() - start
    peak = peak_memory_mb(device)
    val = prepare_samples(model, val_vols, profile.preprocessing, val_settings, device, store, fingerprint)
    metrics = AdapterTrainer(model, val_settings, device).evaluate(val, feed_logits=True, clicks=3)
    volume_dice = three_d_dice(model, profile, val_vols, device) if args.three_d and args.dataset == "brats" else None
    counts = model.parameter_counts()
    return {
        "dataset": args.dataset, "design": args.design, "head": args.head, "volumes": len(train_vols),
        "train_slices": len(train), "val_cases": len(val_vols), "val_slices": len(val),
        "trainable_parameters": counts["trainable"], "head_parameters": counts.get("prompt_free_head", 0),
        "encoder_adapter_parameters": counts.get("encoder_adapters", 0),
        "embedding_seconds": round(prepared, 1), "round_seconds": round(round_seconds, 1),
        "peak_memory_mb": round(peak, 1), "peak_memory_kind": "cuda" if device.type == "cuda" else "rss",
        "box_dice": metrics["box_dice"], "click1_dice": metrics["click1_dice"], "click3_dice": metrics["click3_dice"],
        "auto_dice": metrics.get("auto_dice"), "three_d_dice": volume_dice,
        "epochs": result.epochs_run if result else 0,
        "steps_per_epoch": args.steps,
        "encoder_adapters_trained": args.encoder_adapters, "threads": torch.get_num_threads(),
        "encoder_checkpointing": args.encoder_checkpointing, "encoder_precision": args.encoder_precision,
    }


def step_cost(args: argparse.Namespace) -> dict:
    """One encoder-adapter training step (forward + backward of a batch of random inputs) in this process:
    seconds and peak memory, with activation checkpointing as ``args.checkpointing`` says; with
    ``args.front`` > 0 the step starts from the output of the encoder's first ``front`` stages (kept, as
    ``train_click_adapter.py --encoder-front-stages`` keeps it) and trains the later stages' adapters."""
    from lib.core.adapters import set_checkpointing
    from lib.core.encoder_stages import encode_back, encode_front, freeze_front
    from lib.core.training import encoder_autocast

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = load_profile(APP / "configs" / "lite_medsam.toml")
    model = AdaptedSam.from_profile(replace(base, adapters=replace(base.adapters, design=args.design))).to(device)
    model.freeze_all_but(["encoder_adapters"])
    set_checkpointing(model.image_encoder, args.checkpointing == "on")
    shape = (args.batch, model.depth_slices, 3, model.img_size, model.img_size)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(device)
    if args.front:
        freeze_front(model, args.front)
        with torch.no_grad():
            front = encode_front(model, x[:, 0], args.front)
    times = []
    for _ in range(args.step_repeats):
        start = time.time()
        with encoder_autocast(device, args.encoder_precision):
            emb = encode_back(model, front, args.front) if args.front else model.encode(x)
        emb.float().square().mean().backward()
        times.append(time.time() - start)
    peak = peak_memory_mb(device)
    return {"design": args.design, "batch": args.batch, "checkpointing": args.checkpointing,
            "encoder_precision": args.encoder_precision, "front_stages_kept": args.front,
            "step_seconds": round(float(np.median(times)), 1), "steps_timed": [round(t, 1) for t in times],
            "peak_memory_mb": round(peak, 1), "threads": torch.get_num_threads()}


def encode_cost(designs: list[str], repeats: int) -> list[dict]:
    """Median ms to encode one new slice (its stack for ``depth``) per design, with the encoder runtime the
    server picks by default (``auto``) and with torch fp32."""
    from lib.serving.runtimes import RuntimeEncoder, probe_input

    base = load_profile(APP / "configs" / "lite_medsam.toml")
    out = []
    for design in designs:
        model = AdaptedSam.from_profile(replace(base, adapters=replace(base.adapters, design=design)))
        x = probe_input(model)
        row: dict = {"design": design, "slices_encoded": model.depth_slices}
        with tempfile.TemporaryDirectory() as cache:
            for runtime in ("auto", "torch"):
                encoder = RuntimeEncoder(model, runtime, Path(cache))
                name = encoder.prepare().name
                times = []
                with torch.inference_mode():
                    encoder(x)
                    for _ in range(repeats):
                        start = time.perf_counter()
                        encoder(x)
                        times.append((time.perf_counter() - start) * 1e3)
                row[f"{runtime}_runtime"] = name
                row[f"{runtime}_ms"] = round(float(np.median(times)), 1)
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def configurations(designs: list[str], heads: list[str]) -> list[tuple[str, str]]:
    """Each design with the default head, and each other head with the default design (``--designs msa
    --heads unet`` is the one round msa / unet: the default design's decoder round only when asked for)."""
    out = [(d, "decoder") for d in designs if d != "msa" or "decoder" in heads]
    out += [("msa", h) for h in heads if h != "decoder" and ("msa", h) not in out]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="brats,hippocampus")
    parser.add_argument("--designs", default=",".join(DESIGNS))
    parser.add_argument("--heads", default=",".join(HEADS))
    parser.add_argument("--volumes", default="1,4", help="labelled training volumes per round")
    parser.add_argument("--epochs", type=int, default=5, help="0: no round (the untrained design, for reference)")
    parser.add_argument("--steps", type=int, default=30, help="steps per epoch")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--slices", type=int, default=24, help="labelled slices per training volume")
    parser.add_argument("--val-cases", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--encoder-adapters", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--encoder-checkpointing", choices=CHECKPOINTING_MODES, default="auto",
                        help="activation checkpointing of the trained encoder (auto: on for depth); the same "
                             "gradients, so only time and memory change")
    parser.add_argument("--encoder-precision", choices=ENCODER_PRECISIONS, default="fp32",
                        help="the trained encoder's passes under bf16 autocast (TrainSettings.encoder_precision); "
                             "with --step-cost: time bf16 too")
    parser.add_argument("--three-d", action=argparse.BooleanOptionalAction, default=True,
                        help="BraTS: 3D Dice from one box per validation volume (the served propagation)")
    parser.add_argument("--embedding-store", type=Path, default=None,
                        help="with --no-encoder-adapters: keep the (base) embeddings in this folder across rounds")
    parser.add_argument("--out", type=Path, default=None, help="write every result as JSON here")
    parser.add_argument("--data", type=Path, default=DATA, help="the shared data folder (default ../shared/data)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="rounds run at once (on a GPU; each still in its own process, times then overlap)")
    parser.add_argument("--step-cost", action="store_true",
                        help="only time one encoder training step per design, activation checkpointing off and on")
    parser.add_argument("--front-stages", default="",
                        help="with --step-cost: time the step with the encoder's first N stages kept, for each N of "
                             "this comma list (0: the whole encoder), checkpointing off")
    parser.add_argument("--step-repeats", type=int, default=1,
                        help="with --step-cost: steps timed in each process (their median is reported)")
    parser.add_argument("--encode-cost", action="store_true",
                        help="only time encoding one new slice per design (default runtime and torch fp32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats for --encode-cost")
    # internal: run one configuration and print its JSON
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dataset", help=argparse.SUPPRESS)
    parser.add_argument("--design", default="msa", help=argparse.SUPPRESS)
    parser.add_argument("--head", default="decoder", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--one-step", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", default="off", help=argparse.SUPPRESS)
    parser.add_argument("--front", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one_round(args)), flush=True)
        return
    if args.step_cost:  # one training step per design, checkpointing off and on, each in its own process
        fronts = [int(v) for v in args.front_stages.split(",")] if args.front_stages else []
        precisions = ["fp32", "bf16"] if args.encoder_precision == "bf16" else ["fp32"]
        for design in args.designs.split(","):
            for mode, front in [("off", f) for f in fronts] or [("off", 0), ("on", 0)]:
                seconds = {}
                for precision in precisions:
                    cmd = [sys.executable, __file__, "--one-step", "--design", design, "--checkpointing", mode,
                           "--batch", str(args.batch), "--front", str(front), "--encoder-precision", precision,
                           "--step-repeats", str(args.step_repeats)]
                    res, err = result_of(cmd)
                    what = f"{design} checkpointing {mode}, front {front}, {precision}"
                    print(json.dumps(res) if res else f"{what}: failed\n{err[-2000:]}", flush=True)
                    seconds[precision] = res["step_seconds"] if res else None
                if len(precisions) > 1 and all(seconds.values()):
                    print(f"{design} checkpointing {mode}: bf16 step {seconds['fp32'] / seconds['bf16']:.2f}x "
                          "faster than fp32", flush=True)
        return
    if args.encode_cost:
        encode_cost(args.designs.split(","), args.repeats)
        return
    if args.one_step:
        print("RESULT " + json.dumps(step_cost(args)), flush=True)
        return
    if not args.data.is_dir():
        sys.exit(f"{args.data} not found")
    common = ["--epochs", str(args.epochs), "--steps", str(args.steps), "--batch", str(args.batch), "--lr",
              str(args.lr), "--slices", str(args.slices), "--val-cases", str(args.val_cases), "--seed", str(args.seed),
              "--encoder-adapters" if args.encoder_adapters else "--no-encoder-adapters",
              "--three-d" if args.three_d else "--no-three-d", "--encoder-checkpointing", args.encoder_checkpointing,
              "--encoder-precision", args.encoder_precision,
              *(["--embedding-store", str(args.embedding_store)] if args.embedding_store else [])]
    runs = [(dataset, n, design, head) for dataset in args.datasets.split(",")
            for n in (int(v) for v in args.volumes.split(","))
            for design, head in configurations(args.designs.split(","), args.heads.split(","))]
    finished: dict[int, dict] = {}  # by position in runs
    lock = threading.Lock()

    def run(index: int) -> None:
        dataset, n, design, head = runs[index]
        cmd = [sys.executable, __file__, "--one", "--dataset", dataset, "--design", design, "--head", head,
               "--n", str(n), "--data", str(args.data), *common]
        res, err = result_of(cmd)
        if res is None:
            print(f"{dataset} n={n} {design}/{head}: failed\n{err[-2000:]}", flush=True)
            return
        res["concurrent_rounds"] = args.jobs
        print(json.dumps(res), flush=True)
        with lock:
            finished[index] = res
            if args.out:  # rewritten after every round, so a run cut short keeps what it finished
                args.out.parent.mkdir(parents=True, exist_ok=True)
                done = [finished[i] for i in sorted(finished)]
                args.out.write_text(json.dumps({"argv": sys.argv[1:], "results": done}, indent=2) + "\n")

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(run, range(len(runs))))
    results = [finished[i] for i in sorted(finished)]
    print("\n| dataset | volumes | design | head | trainable | round s | peak MB | box | 1 click | 3 clicks | 3D "
          "| auto |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        auto = f"{r['auto_dice']:.3f}" if r["auto_dice"] is not None else "–"
        volume = f"{r['three_d_dice']:.3f}" if r.get("three_d_dice") is not None else "–"
        print(f"| {r['dataset']} | {r['volumes']} | {r['design']} | {r['head']} | {r['trainable_parameters']:,} | "
              f"{r['round_seconds']:.0f} | {r['peak_memory_mb']:.0f} | {r['box_dice']:.3f} | {r['click1_dice']:.3f} | "
              f"{r['click3_dice']:.3f} | {volume} | {auto} |")


if __name__ == "__main__":
    main()
