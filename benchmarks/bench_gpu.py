"""The GPU path (issue 17), measured in one process on a CUDA machine (no HTTP: the engine and the server's
own scheduler, as lib/server.py runs them; the lent GPU machine has no MONAI Label):

    python benchmarks/bench_gpu.py [--device cuda] [--repeats 30] [--annotator-runs 1:1:0:0,8:8:0:1,...] [--json F]

1. Encoder runtimes on the device: torch fp32, torch_fp16, torch_bf16, and the CUDA-graph replays
   cuda_graph and cuda_graph_fp16 (lib/serving/cuda_graphs.py; ``auto`` serves the fastest). Median ms per
   slice alone and per slice in a batch of 8 (CUDA-synchronised, runtimes interleaved), the probe
   embedding's error, and the masks against torch fp32's on the shipped scans (bench_encoder.py's slices:
   tight box, one interior click, both; mean and min Dice).
2. Annotators at once: N client threads through lib/serving/scheduler.py (``scheduler_workers`` = N) and
   one InteractiveSegmenter, each opening new slices of the shipped scans in turn (a lone click at a
   structure's interior point, then a correction click on that slice, now cached), with ``encode_batch``
   1 (each encode alone) and 8 (lib/serving/encode_batching.py), without think time (capacity) and with 1 s
   between requests: first-prompt and click latency p50 / p95, the first prompts' encoder and decoder time
   by the engine's own account, first prompts per second, the encoders' mean batch.
3. 3D propagation from one tight box on the spleen CT, each runtime with an empty cache: ms per slice and
   3D Dice against the reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_encoder import PROFILE, SAMPLE, dice, model_inputs, scan_slices, served_model, session_masks  # noqa: E402

from lib.core.annotator import interior_point  # noqa: E402
from lib.core.config import load_profile  # noqa: E402
from lib.core.engine import InteractiveSegmenter  # noqa: E402
from lib.core.prompts import parse_prompts  # noqa: E402
from lib.core.volume import load_volume  # noqa: E402
from lib.serving.runtimes import RuntimeEncoder, relative_error  # noqa: E402
from lib.serving.scheduler import InferenceScheduler, Priority, SchedulerSettings  # noqa: E402

RUNTIMES = ("torch", "torch_fp16", "torch_bf16", "cuda_graph", "cuda_graph_fp16")
SCANS = ("spleen_ct", "abdomen_ct", "abdomen_mr")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 1) if values else float("nan")


def encoder_rows(device: torch.device, repeats: int) -> dict:
    model = served_model().to(device)
    slices = scan_slices()
    inputs = [x.to(device) for x in model_inputs(model, slices)]
    one, eight = inputs[0], torch.cat([inputs[n % len(inputs)] for n in range(8)])
    encoders = {}
    for name in RUNTIMES:
        encoder = RuntimeEncoder(model, name)
        built = encoder.prepare()
        if built.name != name:
            print(f"{name}: not available ({encoder.failures.get(name)}); skipped", flush=True)
            continue
        encoders[name] = built
    times: dict[tuple[str, int], list[float]] = {(n, b): [] for n in encoders for b in (1, 8)}
    with torch.inference_mode():
        for _ in range(3):  # warm-up (cuDNN autotuning, allocator)
            for built in encoders.values():
                built.encode(one), built.encode(eight)
        for _ in range(repeats):
            for name, built in encoders.items():
                for b, x in ((1, one), (8, eight)):
                    sync(device)
                    start = time.perf_counter()
                    built.encode(x)
                    sync(device)
                    times[(name, b)].append((time.perf_counter() - start) * 1e3 / b)
        reference = [model.encode(x) for x in inputs]
    fp32_masks = session_masks(model, None, slices, device)
    rows = {}
    for name, built in encoders.items():
        with torch.inference_mode():
            errors = [relative_error(built.encode(x), r) for x, r in zip(inputs, reference, strict=True)]
        masks = session_masks(model, built.encode, slices, device)
        scores = [dice(a, b) for a, b in zip(masks, fp32_masks, strict=True)]
        rows[name] = {
            "ms_per_slice": round(statistics.median(times[(name, 1)]), 2),
            "ms_per_slice_batch8": round(statistics.median(times[(name, 8)]), 2),
            "probe_error": built.probe_error,
            "embedding_rel_l2_max": max(errors),
            "mask_dice_mean": round(float(np.mean(scores)), 4),
            "mask_dice_min": round(float(np.min(scores)), 4),
        }
    auto = RuntimeEncoder(model, "auto")
    rows["auto"] = {"serves": auto.prepare().name}
    base = rows["torch"]["ms_per_slice"]
    for row in rows.values():
        if "ms_per_slice" in row:
            row["speedup_vs_torch_fp32"] = round(base / row["ms_per_slice"], 2)
    print(f"\nencoder on {device} ({len(slices)} slices x 3 prompts; medians of {repeats})")
    print("auto serves", rows["auto"]["serves"])
    print(f"{'runtime':16s} {'ms/slice':>9s} {'batch 8':>9s} {'vs fp32':>8s} {'emb err':>9s} {'Dice':>7s} {'min':>7s}")
    for name, r in rows.items():
        if name == "auto":
            continue
        print(f"{name:16s} {r['ms_per_slice']:9.2f} {r['ms_per_slice_batch8']:9.2f} {r['speedup_vs_torch_fp32']:8.2f} "
              f"{r['embedding_rel_l2_max']:9.2e} {r['mask_dice_mean']:7.4f} {r['mask_dice_min']:7.4f}", flush=True)
    return rows


def opening_items() -> list[tuple]:
    """(scan, volume, k, click ijk): every labelled slice of each shipped scan's largest structure."""
    items = []
    for name in SCANS:
        volume, label = load_volume(SAMPLE / f"{name}.nii.gz"), load_volume(SAMPLE / "reference" / f"{name}.nii.gz")
        values, counts = np.unique(label.array[label.array > 0], return_counts=True)
        value = values[np.argmax(counts)]
        for k in range(volume.shape[2]):
            region = label.array[:, :, k] == value
            if region.sum() >= 20:
                i, j = interior_point(region)
                items.append((name, volume, k, [int(i), int(j), k]))
    return items


def annotator_run(
    profile, device: torch.device, annotators: int, batch: int, threads: int, think: float, items: list[tuple]
) -> dict:
    inference = replace(profile.inference, encode_batch=batch)
    segmenter = InteractiveSegmenter(replace(profile, inference=inference), adapter_dir=None, device=str(device))
    segmenter.warm_up()
    settings = SchedulerSettings(
        general_workers=annotators,
        queue_limit=10_000,
        client_queue_limit=100,
        prefetch_slices=0,
        worker_nice=0,
        torch_threads=threads,
    )
    threads_before = torch.get_num_threads()
    scheduler = InferenceScheduler(settings)
    first_ms: list[float] = []
    click_ms: list[float] = []
    engine_ms: dict[str, list[float]] = {"encoder": [], "decoder": []}  # the first prompts' own account
    lock, start_line = threading.Lock(), threading.Barrier(annotators)

    def ask(priority: Priority, client: str, volume, request: dict) -> tuple[float, dict]:
        prompts = parse_prompts(request, volume.shape)
        start = time.perf_counter()
        out = scheduler.submit(
            priority, client, lambda: segmenter.segment(volume, prompts, three_d=False, state_key=(client, "x", "y"))
        ).result(600)
        return (time.perf_counter() - start) * 1e3, out.params.get("latency_ms", {})

    def annotator(n: int) -> None:
        client = f"annotator-{n}"
        start_line.wait()
        for _, volume, k, ijk in items[n::annotators]:
            first, latency = ask(Priority.FIRST_PROMPT, client, volume, {"foreground": [ijk]})
            time.sleep(think)
            corner = [min(4, volume.shape[0] - 1), min(4, volume.shape[1] - 1), k]
            click, _ = ask(Priority.CLICK, client, volume, {"foreground": [ijk], "background": [corner]})
            time.sleep(think)
            with lock:
                first_ms.append(first)
                click_ms.append(click)
                for part, values in engine_ms.items():
                    values.append(latency.get(part, float("nan")))

    workers = [threading.Thread(target=annotator, args=(n,)) for n in range(annotators)]
    began = time.perf_counter()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    wall = time.perf_counter() - began
    scheduler.close()
    torch.set_num_threads(threads_before)
    batchers = [loaded.encode.batcher for loaded in (segmenter.current(), segmenter.bare_model())]
    calls, encoded = sum(b.calls for b in batchers), sum(b.items for b in batchers)
    return {
        "annotators": annotators,
        "encode_batch": batch,
        "torch_threads": threads or threads_before,
        "think_s": think,
        "first_prompts": len(first_ms),
        "first_p50_ms": pct(first_ms, 50),
        "first_p95_ms": pct(first_ms, 95),
        "click_p50_ms": pct(click_ms, 50),
        "click_p95_ms": pct(click_ms, 95),
        "first_encoder_p50_ms": pct(engine_ms["encoder"], 50),
        "first_decoder_p50_ms": pct(engine_ms["decoder"], 50),
        "first_prompts_per_s": round(len(first_ms) / wall, 1),
        "encoder_calls": calls,
        "mean_encoder_batch": round(encoded / max(calls, 1), 2),
        "runtime": segmenter.current().encode.name,
    }


def propagation_rows(profile, device: torch.device) -> dict:
    volume, label = load_volume(SAMPLE / "spleen_ct.nii.gz"), load_volume(SAMPLE / "reference" / "spleen_ct.nii.gz")
    truth = label.array > 0
    ks = [k for k in range(volume.shape[2]) if truth[:, :, k].any()]
    k = ks[len(ks) // 2]
    rows_, cols_ = np.nonzero(truth[:, :, k])
    roi = [int(rows_.min()), int(rows_.max()), int(cols_.min()), int(cols_.max()), k, k]
    out = {}
    for name in RUNTIMES:
        inference = replace(profile.inference, encoder_runtime=name)
        segmenter = InteractiveSegmenter(replace(profile, inference=inference), adapter_dir=None, device=str(device))
        segmenter.warm_up()
        prompts = parse_prompts({"roi": roi}, volume.shape)
        sync(device)
        start = time.perf_counter()
        result = segmenter.segment(volume, prompts, three_d=True)
        sync(device)
        seconds = time.perf_counter() - start
        got = result.label > 0
        out[name] = {
            "ms_per_slice": round(seconds * 1e3 / volume.shape[2], 1),
            "dice_3d": round(dice(got, truth), 4),
            "slices": volume.shape[2],
            "served_by": segmenter.current().encode.name,  # another runtime where this one is unavailable
        }
        print(f"3D propagation {name}: {out[name]}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--annotator-runs", default="1:1:0:0,8:1:0:0,8:8:0:0,8:1:0:1,8:8:0:1",
                        help="ANNOTATORS:ENCODE_BATCH:TORCH_THREADS:THINK_S,... (threads 0: torch's default)")
    parser.add_argument("--parts", default="encoder,annotators,propagation")
    parser.add_argument("--max-items", type=int, default=0, help="slices opened in the annotator runs (0: all)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    parts = set(args.parts.split(","))
    report: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    print(report, flush=True)

    def save() -> None:  # after each part: a run stopped at its time limit keeps what it measured
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))

    if "encoder" in parts:
        report["encoder"] = encoder_rows(device, args.repeats)
        save()
    profile = load_profile(PROFILE)
    if "annotators" in parts:
        items = opening_items()
        print(f"annotator runs: {len(items)} slices opened", flush=True)
        items = items[: args.max_items or None]
        report["annotators"] = []
        for run in args.annotator_runs.split(","):
            fields = run.split(":")
            annotators, batch, threads = (int(v) for v in fields[:3])
            think = float(fields[3]) if len(fields) > 3 else 0.0
            row = annotator_run(profile, device, annotators, batch, threads, think, items)
            print("annotators", row, flush=True)
            report["annotators"].append(row)
            save()
    if "propagation" in parts:
        report["propagation"] = propagation_rows(profile, device)
    if device.type == "cuda":
        report["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
        print("peak GPU memory (MB, allocated by torch):", report["peak_gpu_memory_mb"])
    save()


if __name__ == "__main__":
    main()
