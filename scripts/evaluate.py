"""Evaluate interactive segmentation on a labelled dataset: box Dice, Dice after 1/3/5 clicks, NoC@85/90,
3D propagation Dice and NSD, latency — per case, per structure and overall, for one or more methods.

    .venv/bin/python scripts/evaluate.py DATASET --methods base,shipped --out results/NAME [options]

DATASET: a folder of .npz volumes, a PNG mask index (.json or a folder with image2label_*.json), a
folder with one sub-folder per case (--image-name/--label-name), or an image folder with labels
(--labels DIR, default DATASET/labels/final). Methods: ``base`` (bare base model), ``shipped`` (the
profile's shipped adapters), a path to an adapter checkpoint, or ``http://host:port`` (a live server
whose datastore holds the cases under their ids: measures what users get). Writes results.json (every
number), results.md (tables) and PNG plots (Dice against clicks, per-case bars) into --out.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "apps" / "medsam_adapter"
sys.path.insert(0, str(APP))

from lib.core.cache import StoredEmbeddingCache  # noqa: E402
from lib.core.config import ProfileError, load_profile, setting_pairs  # noqa: E402
from lib.core.datasets import load_dataset, merge_structures  # noqa: E402
from lib.core.engine import InteractiveSegmenter  # noqa: E402
from lib.core.eval_backends import HttpBackend, InProcessBackend  # noqa: E402
from lib.core.evaluation import (  # noqa: E402
    EvalSettings,
    dice_curve,
    evaluate_cases,
    per_case,
    records_as_dicts,
    summarize,
)
from lib.serving.runtimes import RuntimeEncoder  # noqa: E402


def backend_for(method: str, profile_name: str, device: str | None, inference: dict, store: Path | None):
    if method.startswith(("http://", "https://")):
        return HttpBackend(method)
    try:
        profile = load_profile(APP / "configs" / f"{profile_name}.toml", inference)
    except ProfileError as e:
        sys.exit(f"--inference: {e}")
    if method == "base":
        profile = replace(profile, adapter_checkpoint=None)
    elif method != "shipped":
        path = Path(method)
        if not path.is_file():
            sys.exit(f"--methods: {method} is neither base, shipped, a URL nor an adapter checkpoint file")
        profile = replace(profile, adapter_checkpoint=path.resolve())
    elif profile.adapter_checkpoint is None or not profile.adapter_checkpoint.is_file():
        sys.exit(f"profile {profile_name} ships no adapter checkpoint")
    cache = None
    if store is not None:
        # one folder per encoder runtime (OpenVINO and torch embeddings differ slightly); auto named by what
        # it serves here, which depends on the machine (lib/serving/auto_runtime.py)
        runtime = profile.inference.encoder_runtime
        if runtime == "auto":
            encode = InteractiveSegmenter(profile, adapter_dir=None, device=device).current().encode
            runtime = encode.prepare().name if isinstance(encode, RuntimeEncoder) else "torch"
        folder = store / profile.name / runtime
        cache = StoredEmbeddingCache(profile.inference.embedding_cache_mb, folder)
    return InProcessBackend(InteractiveSegmenter(profile, adapter_dir=None, device=device, embeddings=cache))


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }


def fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def markdown(report: dict) -> str:
    methods = report["methods"]
    noc_keys = [k for k in next(iter(methods.values()))["overall"] if k.startswith("noc") and "failure" not in k]
    lines = [
        f"### {report['dataset']} ({report['reference']})",
        "",
        f"{report['cases']} cases, {next(iter(methods.values()))['overall'].get('slices', 0)} slice sessions; "
        f"machine: {report['machine']['processor']}, {report['machine']['cpus']} CPUs"
        + (f", {report['machine']['cuda']}" if report["machine"]["cuda"] else ", no GPU"),
        "",
        "| method | box | jittered box | 1 click | 3 clicks | 5 clicks | "
        + " | ".join(f"NoC@{k[3:]} (fail)" for k in noc_keys)
        + " | 3D Dice | NSD |",
        "|---|" + "---|" * (7 + len(noc_keys)),
    ]
    for name, m in methods.items():
        o = m["overall"]
        nsd = next((v for k, v in o.items() if k.startswith("nsd_3d")), None)
        lines.append(
            f"| {name} | {fmt(o.get('box_dice'))} | {fmt(o.get('jittered_box_dice'))} | {fmt(o.get('click1_dice'))} | "
            f"{fmt(o.get('click3_dice'))} | {fmt(o.get('click5_dice'))} | "
            + " | ".join(f"{fmt(o.get(k), 1)} ({fmt(100 * o.get(k + '_failure_rate', float('nan')), 0)}%)"
                         for k in noc_keys)
            + f" | {fmt(o.get('dice_3d'))} | {fmt(nsd)} |"
        )
    lines += ["", "| method | encoder (first prompt on a slice) ms | decoder ms | end to end per click ms (p90) |",
              "|---|---|---|---|"]
    for name, m in methods.items():
        o = m["overall"]
        lines.append(f"| {name} | {fmt(o.get('first_encoder_ms_median'), 0)} | {fmt(o.get('decoder_ms_median'), 1)} | "
                     f"{fmt(o.get('end_to_end_ms_median'), 0)} ({fmt(o.get('end_to_end_ms_p90'), 0)}) |")
    return "\n".join(lines) + "\n"


def plots(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in report["methods"].items():
        curve = m["dice_curve"]
        ax.plot(range(1, len(curve) + 1), curve, marker="o", ms=3, label=name)
        if m["overall"].get("box_dice") is not None:
            ax.axhline(m["overall"]["box_dice"], ls=":", lw=1, color=ax.lines[-1].get_color())
    ax.set(xlabel="clicks", ylabel="mean Dice", ylim=(0, 1), title=f"{report['dataset']}: Dice against clicks "
           "(dotted: tight box)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "dice_vs_clicks.png", dpi=110)
    plt.close(fig)
    written.append("dice_vs_clicks.png")

    cases = list(next(iter(report["methods"].values()))["per_case"])
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(cases) + 2), 4))
    n = len(report["methods"])
    width = 0.8 / (2 * n)
    for i, (name, m) in enumerate(report["methods"].items()):
        for j, key in enumerate(("box_dice", "click5_dice")):
            xs = [c + (2 * i + j - n + 0.5) * width for c in range(len(cases))]
            ax.bar(xs, [m["per_case"][c].get(key, 0) for c in cases], width, label=f"{name}: {key.split('_')[0]}")
    ax.set_xticks(range(len(cases)), cases, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="Dice", ylim=(0, 1), title=f"{report['dataset']}: per case")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "per_case.png", dpi=110)
    plt.close(fig)
    written.append("per_case.png")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--methods", default="base",
                        help="comma-separated: base, shipped, checkpoint path, URL; NAME=METHOD names a column")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--name", help="title of the tables (default: the --out folder's name)")
    parser.add_argument("--profile", default="lite_medsam")
    parser.add_argument("--labels", type=Path, help="label folder for an image folder dataset")
    parser.add_argument("--image-name", help="image file name inside each case folder")
    parser.add_argument("--label-name", help="label file name inside each case folder")
    parser.add_argument("--merge-labels", metavar="NAME", help="evaluate every label value > 0 as one structure")
    parser.add_argument("--structures", help="comma-separated label names or values (default: all present)")
    parser.add_argument("--reference", default="ground truth",
                        help="what the labels are, printed with the results (e.g. 'TotalSegmentator output')")
    parser.add_argument("--max-clicks", type=int, default=20)
    parser.add_argument("--max-slices", type=int, default=5, help="slices per structure")
    parser.add_argument("--no-3d", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--first-click-depth", type=float, default=1.0,
                        help="1: the first click at the object's deepest point (the protocol); below 1 a seeded "
                             "random point at least that fraction of its depth inside (a less exact annotator)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--cases", help="only cases whose id matches this pattern (e.g. 'validation_*'); "
                                        "several patterns separated by commas")
    parser.add_argument("--inference", action="append", default=[], metavar="KEY=VALUE",
                        help="override a profile [inference] setting for in-process methods (repeatable)")
    parser.add_argument("--embedding-store", type=Path,
                        help="keep image embeddings in this folder and reuse them in later runs")
    parser.add_argument("--append", action="store_true",
                        help="add these methods to an earlier results.json in --out (same dataset and settings)")
    args = parser.parse_args()
    try:
        overrides = setting_pairs(args.inference)
    except ProfileError as e:
        sys.exit(str(e))
    try:
        settings = EvalSettings(max_clicks=args.max_clicks, max_slices_per_structure=args.max_slices,
                                three_d=not args.no_3d, seed=args.seed, first_click_depth=args.first_click_depth)
    except ValueError as e:
        sys.exit(f"--first-click-depth: {e}")

    cases = load_dataset(args.dataset, args.labels, args.image_name, args.label_name)
    if args.cases:
        patterns = args.cases.split(",")
        cases = [c for c in cases if any(fnmatch.fnmatch(c.case_id, p) for p in patterns)]
        if not cases:
            sys.exit(f"--cases {args.cases}: no case id matches")
    if args.merge_labels:
        cases = merge_structures(cases, args.merge_labels)
    structures = args.structures.split(",") if args.structures else None
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "dataset": args.name or args.out.name,
        "dataset_path": str(args.dataset),
        "reference": args.reference,
        "cases": len(cases),
        "structures": structures,
        "case_filter": args.cases,
        "inference_overrides": args.inference,
        "settings": asdict(settings),
        "profile": args.profile,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "command": "python scripts/evaluate.py " + " ".join(sys.argv[1:]),
        "methods": {},
    }
    previous = args.out / "results.json"
    if args.append and previous.is_file():
        earlier = json.loads(previous.read_text())
        defaults = json.loads(json.dumps(asdict(EvalSettings())))  # settings added since were at their defaults
        same_settings = {**defaults, **earlier["settings"]} == json.loads(json.dumps(report["settings"]))
        if not same_settings or earlier["dataset_path"] != report["dataset_path"]:
            sys.exit(f"--append: {previous} was made with another dataset or settings")
        report["methods"] = earlier["methods"]
        report["command"] = earlier["command"] + " && " + report["command"]
    for spec in args.methods.split(","):
        start = time.time()
        method, _, source = spec.rpartition("=") if "=" in spec and "://" not in spec else (spec, "", spec)
        backend = backend_for(source, args.profile, args.device, overrides,
                              args.embedding_store)
        slices, volumes = evaluate_cases(backend, cases, settings, structures,
                                         progress=lambda m, method=method: print(f"[{method}] {m}", flush=True))
        report["methods"][method] = {
            "overall": summarize(slices, volumes, settings),
            "dice_curve": dice_curve(slices),
            "per_case": per_case(slices, volumes),
            "records": records_as_dicts(slices, volumes),
            "source": source,
            "inference_overrides": args.inference,
            "seconds": round(time.time() - start, 1),
        }
        print(json.dumps({method: report["methods"][method]["overall"]}, indent=1), flush=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "results.md").write_text(markdown(report))
    written = plots(report, args.out)
    print(markdown(report))
    print(f"wrote {args.out}/results.json, results.md, " + ", ".join(written))


if __name__ == "__main__":
    main()
