"""Image-encoder runtimes (lib/serving/runtimes.py) against today's torch fp32 path, in one process.

    nice -n 10 .venv/bin/python benchmarks/bench_encoder.py [--repeats 7] [--runtimes torch,openvino_fp32,...]
        [--fresh] [--torch-options] [--no-memory] [--json out.json]

For each runtime, on LiteMedSAM with the shipped click adapter (the model the server serves):
- median ms per 256x256 slice over warm repeats, runtimes interleaved round by round, and the ratio to
  torch fp32 measured in the same rounds;
- masks against torch fp32's on the shipped scans (sample-data/*.nii.gz, labels in sample-data/reference):
  the middle labelled slice of the two largest structures per scan, prompted with a tight box, one interior
  click, and box + click through SlicePredictor (mean and min Dice), and the embeddings' relative L2 error;
- time to build: export + compile (``--fresh``: into an empty cache folder) or load from the cache;
- peak RSS of a separate process that loads the model, builds that runtime and encodes (``--no-memory``
  skips it).
``--torch-options`` also times torch variants that are not runtimes (channels-last, torch.compile, int8
dynamic quantisation of the Linear layers). ``--int8`` (needs ``pip install nncf``) also times and checks
OpenVINO int8 graphs from NNCF post-training quantisation, calibrated on other slices of the shipped
scans: the whole encoder, and its MatMul layers only (convolutions kept fp32). Timings on a shared
machine are noisy: compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "apps" / "medsam_adapter"
sys.path.insert(0, str(APP))

from lib.core.annotator import interior_point  # noqa: E402
from lib.core.cache import EmbeddingCache  # noqa: E402
from lib.core.checkpoint import AdapterCheckpoint  # noqa: E402
from lib.core.config import load_profile  # noqa: E402
from lib.core.datasets import load_dataset  # noqa: E402
from lib.core.model import AdaptedSam  # noqa: E402
from lib.core.orientation import SliceView  # noqa: E402
from lib.core.predictor import LoadedModel, SlicePredictor  # noqa: E402
from lib.core.preprocess import LetterboxFrame, choose_window, normalize_slice  # noqa: E402
from lib.core.prompts import mask_box  # noqa: E402
from lib.serving import runtimes  # noqa: E402

PROFILE = APP / "configs" / "lite_medsam.toml"
SAMPLE = ROOT / "sample-data"


def served_model() -> AdaptedSam:
    profile = load_profile(PROFILE)
    model = AdaptedSam.from_profile(profile)
    AdapterCheckpoint.load(profile.adapter_checkpoint).apply_to(model)
    return model.eval()


def structure_slices(positions: tuple[tuple[int, int], ...]) -> list[tuple]:
    """(image, window, spacing, ground truth, name) of the two largest structures of every shipped scan, at
    each ``(num, den)`` position of the structure's labelled slice range (slice ``ks[num * len(ks) // den]``)."""
    pre = load_profile(PROFILE).preprocessing
    out = []
    for case in load_dataset(SAMPLE, SAMPLE / "reference"):
        view = SliceView.from_affine(case.image.affine, 2)
        window = choose_window(case.image.array, pre)
        names = case.structures()
        sizes = {v: int((case.label.array == v).sum()) for v in names}
        for value in sorted(sizes, key=sizes.get, reverse=True)[:2]:
            ks = [k for k in range(case.image.shape[2]) if (case.label.array[:, :, k] == value).any()]
            for k in dict.fromkeys(ks[num * len(ks) // den] for num, den in positions):
                gt = view.slice(case.label.array, k) == value
                name = f"{case.case_id}/{names[value]}"
                out.append((view.slice(case.image.array, k), window, view.spacing, gt, name))
    return out


def scan_slices() -> list[tuple]:
    """The middle labelled slice of the two largest structures (the slices masks are checked on)."""
    return structure_slices(((1, 2),))


def model_inputs(model: AdaptedSam, slices: list[tuple]) -> list[torch.Tensor]:
    pre = load_profile(PROFILE).preprocessing
    out = []
    for image, window, spacing, _, _ in slices:
        frame = LetterboxFrame.fit(image.shape, model.img_size, spacing)
        out.append(frame.image_to_model(normalize_slice(image, window, pre.per_slice_minmax)))
    return out


def session_masks(model: AdaptedSam, encode, slices: list[tuple], device: torch.device | str = "cpu") -> list:
    profile = load_profile(PROFILE)
    predictor = SlicePredictor(
        LoadedModel(model, 0, "bench", encode=encode),
        EmbeddingCache(256),
        profile.preprocessing,
        profile.inference,
        device,
    )
    out = []
    for image, window, spacing, gt, _ in slices:
        box, click, fg = mask_box(gt), np.array([interior_point(gt)]), np.array([1])
        out.append(predictor.predict(image, window, spacing, box_rc=box).mask)
        out.append(predictor.predict(image, window, spacing, click, fg).mask)
        out.append(predictor.predict(image, window, spacing, click, fg, box).mask)
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 1.0 if not a.any() and not b.any() else float(2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def torch_variants(model: AdaptedSam) -> dict:
    """Torch options that are not runtimes, each as an encode callable (built here, timed by the caller)."""
    import copy

    variants = {}

    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    variants["torch channels_last"] = lambda x: cl.encode(x.contiguous(memory_format=torch.channels_last))
    quantized = copy.deepcopy(model)
    quantized.image_encoder = torch.ao.quantization.quantize_dynamic(
        quantized.image_encoder, {torch.nn.Linear}, dtype=torch.qint8
    )
    variants["torch int8 dynamic (Linear)"] = quantized.encode
    try:
        compiled = torch.compile(model.encode)
        variants["torch.compile"] = compiled
    except Exception as e:  # noqa: BLE001 - report, do not stop the benchmark
        print(f"torch.compile unavailable: {e}")
    return variants


def calibration_inputs(model: AdaptedSam, per_scan: int = 6) -> list[np.ndarray]:
    """Model inputs from evenly spaced slices of every shipped scan (not the slices the masks are checked on)."""
    pre = load_profile(PROFILE).preprocessing
    slices = []
    for case in load_dataset(SAMPLE, SAMPLE / "reference"):
        view = SliceView.from_affine(case.image.affine, 2)
        window = choose_window(case.image.array, pre)
        depth = case.image.shape[2]
        for k in np.linspace(0.15 * depth, 0.85 * depth, per_scan).astype(int):
            slices.append((view.slice(case.image.array, int(k)), window, view.spacing, None, case.case_id))
    return [t.numpy() for t in model_inputs(model, slices)]


def int8_variants(model: AdaptedSam, cache_dir: Path | None) -> dict:
    """OpenVINO int8 encoders from NNCF post-training quantisation of the exported IR (built here)."""
    import nncf

    items = calibration_inputs(model)
    calibration = nncf.Dataset(items)
    ov_model = runtimes.ExportedEncoder(model, cache_dir or runtimes.default_cache_dir()).read()
    transformer = {"model_type": nncf.ModelType.TRANSFORMER, "preset": nncf.QuantizationPreset.MIXED}
    convolutions = nncf.IgnoredScope(types=["Convolution", "GroupConvolution"])
    variants = {}
    for name, options in (
        ("openvino int8 (all layers)", transformer),
        ("openvino int8 (MatMul only)", {**transformer, "ignored_scope": convolutions}),
    ):
        quantized = nncf.quantize(ov_model.clone(), calibration, subset_size=len(items), **options)
        variants[name] = runtimes.compile_openvino(quantized, "fp32")
    return variants


def validation_slices() -> list[tuple]:
    """Labelled slices at a third and two thirds of each structure's extent (the mask check uses the middle
    ones): the data int8 accuracy control may look at."""
    return structure_slices(((1, 3), (2, 3)))


def int8_accuracy_variant(model: AdaptedSam, cache_dir: Path | None, max_drop: float) -> dict:
    """NNCF int8 with accuracy control: quantised layers are put back to fp32, most harmful first, until
    the mean mask Dice against fp32 masks on :func:`validation_slices` drops by at most ``max_drop``."""
    import nncf

    ov_model = runtimes.ExportedEncoder(model, cache_dir or runtimes.default_cache_dir()).read()
    slices = validation_slices()
    inputs = model_inputs(model, slices)
    reference = [session_masks(model, None, [s]) for s in slices]

    def validation_fn(compiled, items) -> tuple[float, list[float]]:
        def encode(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(np.asarray(compiled(x.numpy())[0]).copy())

        per = []
        for i in items:
            masks = session_masks(model, encode, [slices[i]])
            per.append(float(np.mean([dice(a, b) for a, b in zip(masks, reference[i], strict=True)])))
        return float(np.mean(per)), per

    quantized = nncf.quantize_with_accuracy_control(
        ov_model.clone(), nncf.Dataset(calibration_inputs(model)),
        nncf.Dataset(list(range(len(slices))), lambda i: inputs[i].numpy()), validation_fn,
        max_drop=max_drop, drop_type=nncf.DropType.ABSOLUTE, model_type=nncf.ModelType.TRANSFORMER,
        preset=nncf.QuantizationPreset.MIXED, subset_size=36,
    )
    return {f"openvino int8 (accuracy control {max_drop})": runtimes.compile_openvino(quantized, "fp32")}


def batch_costs(model: AdaptedSam, x: torch.Tensor, batches: list[int], repeats: int) -> dict[int, float]:
    """Median ms per slice of the OpenVINO fp32 encoder exported for a fixed batch of slices (what
    encode-ahead in 3D propagation would run), the batch sizes interleaved."""
    import warnings

    openvino = runtimes._openvino()
    requests = {}
    for b in batches:
        example = x.expand(b, *x.shape[1:]).contiguous()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            graph = openvino.convert_model(runtimes._EncodeModule(model).eval(), example_input=example,
                                           input=[tuple(example.shape)])
        requests[b] = (runtimes.compile_openvino(graph, "fp32"), example)
        requests[b][0]._requests[0].infer({0: example.numpy()})  # warm-up (the whole batch in one call)
    times: dict[int, list[float]] = {b: [] for b in batches}
    for _ in range(repeats):
        for b, (encode, example) in requests.items():
            start = time.perf_counter()
            encode._requests[0].infer({0: example.numpy()})
            times[b].append((time.perf_counter() - start) * 1e3 / b)
    return {b: round(statistics.median(t), 1) for b, t in times.items()}


def peak_rss_of(runtime: str, cache_dir: Path | None) -> float:
    """Peak RSS (MB) of a fresh process that loads the model, builds ``runtime`` and encodes 3 times."""
    code = (
        "import resource, sys, torch; sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2]);"
        "import bench_encoder as b; from lib.serving.runtimes import RuntimeEncoder;"
        "m = b.served_model(); e = RuntimeEncoder(m, sys.argv[3], sys.argv[4] or None); x = torch.rand(1, 3, 256, 256);"
        "[e(x) for _ in range(3)]; assert e.name == sys.argv[3], e.failures;"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    args = [sys.executable, "-c", code, str(APP), str(Path(__file__).parent), runtime, str(cache_dir or "")]
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--runtimes", default="torch,torch_bf16,openvino_fp32,openvino_mixed,openvino_bf16")
    parser.add_argument("--fresh", action="store_true", help="export into an empty cache folder (export time)")
    parser.add_argument("--torch-options", action="store_true", help="also time channels-last, compile, int8")
    parser.add_argument("--int8", action="store_true", help="also OpenVINO int8 via NNCF (pip install nncf)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-runtime peak-RSS processes")
    parser.add_argument("--int8-accuracy", type=float, default=0.0,
                        help="also NNCF int8 with accuracy control at this largest mask-Dice drop (e.g. 0.003)")
    parser.add_argument("--batches", default="", help="e.g. 1,2,3: also OpenVINO fp32 ms per slice at these batches")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    names = [n.strip() for n in args.runtimes.split(",") if n.strip()]
    if "torch" not in names:
        names.insert(0, "torch")
    if runtimes.openvino_version() is None:
        names = [n for n in names if not n.startswith("openvino")]
        print("openvino not installed: OpenVINO runtimes skipped")
    cache_dir = Path(tempfile.mkdtemp(prefix="runtime_cache_")) if args.fresh else None
    print(f"torch {torch.__version__}, openvino {runtimes.openvino_version()}, threads {torch.get_num_threads()}")
    auto = runtimes.candidates("auto", "cpu")[:-1] or ["torch"]
    print(f"CPU AMX (bf16 tiles): {runtimes.cpu_has_amx()}; native bf16: {runtimes.cpu_has_native_bf16()}; "
          f"auto {'picks ' + auto[0] if len(auto) == 1 else 'serves the faster of ' + ' and '.join(auto)}")

    model = served_model()
    slices = scan_slices()
    inputs = model_inputs(model, slices)
    encoders, build = {}, {}
    for name in names:
        encoder = runtimes.RuntimeEncoder(model, name, cache_dir)
        built = encoder.prepare()
        if built.name != name:
            print(f"{name}: not available ({encoder.failures.get(name)}); skipped")
            continue
        encoders[name] = built.encode
        how = "exported + compiled" if built.exported else ("loaded + compiled" if name.startswith("open") else "-")
        build[name] = {"build_s": round(built.build_s, 1), "how": how, "probe_error": built.probe_error}
    variants = torch_variants(model) if args.torch_options else {}
    quantized = {}
    if args.int8:
        start = time.perf_counter()
        quantized = int8_variants(model, cache_dir)
        each_s = round((time.perf_counter() - start) / len(quantized), 1)
        build.update({name: {"build_s": each_s, "how": "quantized"} for name in quantized})
    if args.int8_accuracy > 0:
        start = time.perf_counter()
        controlled = int8_accuracy_variant(model, cache_dir, args.int8_accuracy)
        build.update({n: {"build_s": round(time.perf_counter() - start, 1), "how": "quantized"} for n in controlled})
        quantized.update(controlled)
    checked = {**encoders, **quantized}  # runtimes whose masks are compared with fp32's
    timed = {**checked, **variants}

    # warm-up (torch.compile compiles here), then interleaved rounds on a real slice
    x = inputs[0]
    for name, encode in timed.items():
        start = time.perf_counter()
        with torch.inference_mode():
            encode(x)
        if name in variants:
            build[name] = {"build_s": round(time.perf_counter() - start, 1), "how": "first call"}
    times = {name: [] for name in timed}
    for _ in range(args.repeats):
        for name, encode in timed.items():
            start = time.perf_counter()
            with torch.inference_mode():
                encode(x)
            times[name].append((time.perf_counter() - start) * 1e3)

    # quality: embeddings and masks against torch fp32
    with torch.inference_mode():
        reference = [model.encode(t) for t in inputs]
    fp32_masks = session_masks(model, None, slices)
    rows = {}
    base_ms = statistics.median(times["torch"])
    for name, encode in timed.items():
        with torch.inference_mode():
            errors = [runtimes.relative_error(encode(t), r) for t, r in zip(inputs, reference, strict=True)]
        masks = session_masks(model, encode, slices) if name in checked else None
        scores = [dice(a, b) for a, b in zip(masks, fp32_masks, strict=True)] if masks else []
        ms = statistics.median(times[name])
        rows[name] = {
            "ms_per_slice": round(ms, 1),
            "speedup_vs_torch_fp32": round(base_ms / ms, 2),
            "embedding_rel_l2_mean": float(np.mean(errors)),
            "embedding_rel_l2_max": float(np.max(errors)),
            "mask_dice_mean": round(float(np.mean(scores)), 4) if scores else None,
            "mask_dice_min": round(float(np.min(scores)), 4) if scores else None,
            **build.get(name, {}),
        }
    if not args.no_memory:
        for name in encoders:
            rows[name]["peak_rss_mb"] = round(peak_rss_of(name, cache_dir))

    print(
        f"\n{len(slices)} slices x 3 prompts from {SAMPLE.name}/; {args.repeats} interleaved warm repeats; "
        f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
    )
    header = (
        f"{'runtime':30s} {'ms/slice':>9s} {'vs fp32':>8s} {'emb err':>9s} {'mask Dice':>10s} {'min':>7s} "
        f"{'RSS MB':>7s} {'build s':>8s}  how"
    )
    print(header)
    for name, r in rows.items():
        dice_mean = f"{r['mask_dice_mean']:.4f}" if r["mask_dice_mean"] is not None else "-"
        dice_min = f"{r['mask_dice_min']:.4f}" if r["mask_dice_min"] is not None else "-"
        print(
            f"{name:30s} {r['ms_per_slice']:9.1f} {r['speedup_vs_torch_fp32']:7.2f}x "
            f"{r['embedding_rel_l2_mean']:9.2e} {dice_mean:>10s} {dice_min:>7s} "
            f"{r.get('peak_rss_mb', '-')!s:>7s} {r.get('build_s', '-')!s:>8s}  {r.get('how', '')}"
        )
    print("raw ms:", json.dumps({n: [round(t) for t in ts] for n, ts in times.items()}))
    batched = {}
    if args.batches and runtimes.openvino_version() is not None:
        batched = batch_costs(model, x, [int(b) for b in args.batches.split(",")], args.repeats)
        print("openvino fp32 ms per slice by batch:", json.dumps(batched))
    if args.json:
        out = {"rows": rows, "times_ms": times, "slices": [s[4] for s in slices], "batch_ms_per_slice": batched}
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
