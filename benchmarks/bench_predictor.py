"""In-process speed of the model core (no server): encoder per slice, decoder per prompt, cache gain.

    .venv/bin/python benchmarks/bench_predictor.py [--repeats 7] [--device cpu]

Prints medians over repeats, all measured in this one process so ratios are comparable:
- base LiteMedSAM encoder vs the adapted encoder (adapters' cost),
- decoder per prompt (box; box + clicks + previous logits),
- first prompt on a slice (encoder + decoder) vs a further prompt on the same slice (cached),
- a click with fed-back logits on a cached slice: bare LiteMedSAM vs the shipped click adapter
  (interleaved repeats, the adapters' cost per click),
- ``--first-click OTHER.pt``: the engine as served (the profile's encoder and decoder runtimes), a lone
  click on a slice seen for the first time and one on a prefetched slice, the profile's shipped adapters
  against OTHER adapters (interleaved; adapters that change the encoder also need the base model's
  embedding for a lone click's scale candidates),
- the decoder runtimes (lib/serving/decoder_runtime.py) on cached slices of the shipped abdomen CT: torch
  vs the OpenVINO graph for a lone click (its scale candidates included), a correction click on the same
  organ and a foreground click on another organ (a new part, answered alone at its own scale), with the
  masks' Dice against torch's (``--decoder-only`` prints just these).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "apps" / "medsam_adapter" / "configs" / "lite_medsam.toml"
sys.path.insert(0, str(ROOT / "apps" / "medsam_adapter"))

from lib.core.backbones import build_backbone  # noqa: E402
from lib.core.cache import EmbeddingCache  # noqa: E402
from lib.core.checkpoint import AdapterCheckpoint  # noqa: E402
from lib.core.config import (  # noqa: E402
    AdapterSettings,
    InferenceSettings,
    PreprocessSettings,
    ProfileError,
    load_profile,
    setting_pairs,
)
from lib.core.model import AdaptedSam  # noqa: E402
from lib.core.orientation import SliceView  # noqa: E402
from lib.core.predictor import LoadedModel, SlicePredictor  # noqa: E402
from lib.core.preprocess import choose_window  # noqa: E402
from lib.core.prompts import mask_box  # noqa: E402
from lib.core.volume import load_volume  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def click_cost(slice_k, window, spacing, inside, device, repeats: int) -> dict[str, float]:
    """Median ms of one click + previous logits on a cached slice: bare model vs shipped adapter."""
    shipped_path = ROOT / "apps" / "medsam_adapter" / "adapters" / "lite_medsam_clicks.pt"
    bare = AdaptedSam(build_backbone("lite_medsam"), AdapterSettings(encoder=False, decoder=False)).to(device)
    shipped = AdaptedSam(build_backbone("lite_medsam"), AdapterSettings(), labels=AdapterCheckpoint.load(
        shipped_path).labels)
    AdapterCheckpoint.load(shipped_path).apply_to(shipped)
    shipped.to(device).eval()
    click = inside[len(inside) // 2][None]
    times: dict[str, list[float]] = {"bare": [], "shipped": []}
    predictors = {}
    for name, m in (("bare", bare), ("shipped", shipped)):
        p = SlicePredictor(LoadedModel(m, 0, name), EmbeddingCache(64), PreprocessSettings(), InferenceSettings(),
                           device)
        predictors[name] = (p, p.predict(slice_k, window, spacing, click, np.array([1])).low_res_logits)
    for _ in range(repeats):  # interleaved, so drifts in machine load hit both alike
        for name, (p, logits) in predictors.items():
            start = time.perf_counter()
            with torch.inference_mode():
                p.predict(slice_k, window, spacing, click, np.array([1]), None, logits)
            times[name].append((time.perf_counter() - start) * 1e3)
    bare_ms, shipped_ms = statistics.median(times["bare"]), statistics.median(times["shipped"])
    return {"click_bare_model_ms": bare_ms, "click_shipped_adapter_ms": shipped_ms,
            "click_shipped_over_bare_ratio": round(shipped_ms / bare_ms, 3)}


def decoder_runtimes(repeats: int, other: dict | None = None) -> dict[str, float]:
    """Median ms of a lone click and of a correction click on a cached slice through SlicePredictor, the
    shipped click adapter's decoder run by torch, by OpenVINO fp32 and, where the CPU computes bf16 natively,
    by OpenVINO bf16 (interleaved), and mask agreement (OpenVINO fp32 and bf16 against torch).
    ``other``: also OpenVINO with these [inference] settings instead of the profile's (``openvino_other``),
    e.g. other lone-click scales or ``repair_logit = 0``."""
    from lib.serving.decoder_runtime import RuntimeDecoder
    from lib.serving.runtimes import cpu_has_native_bf16

    profile = load_profile(PROFILE)
    other_inference = load_profile(PROFILE, other).inference if other else None  # validated before any build
    served = AdaptedSam.from_profile(profile)
    AdapterCheckpoint.load(profile.adapter_checkpoint).apply_to(served)
    bare = AdaptedSam.from_profile(replace(profile, adapter_checkpoint=None))
    lone = None
    if profile.lone_click_checkpoint is not None:  # the lone-click adapters' answer is a candidate too
        lone = AdaptedSam.from_profile(profile)
        AdapterCheckpoint.load(profile.lone_click_checkpoint).apply_to(lone)
    runtimes = {}
    for name in ("torch", "openvino_fp32", "openvino_bf16")[: 3 if cpu_has_native_bf16() else 2]:
        decoders = {m: RuntimeDecoder(m, name) for m in (served, bare, lone) if m is not None}
        used = {d.prepare() for d in decoders.values()}
        if used != {name}:
            raise SystemExit(f"decoder runtime {name} unavailable: {[d.failure for d in decoders.values()]}")
        # one embedding for all three, as served: the adapters are decoder-side
        bare_loaded = LoadedModel(bare, 0, "lite_medsam:base", decode=decoders[bare])
        lone_loaded = None if lone is None else LoadedModel(lone, 0, "lite_medsam:base", decode=decoders[lone])
        runtimes[name] = SlicePredictor(LoadedModel(served, 0, "lite_medsam:base", shipped=True,
                                                    decode=decoders[served]),
                                        EmbeddingCache(512), profile.preprocessing, profile.inference,
                                        bare=lambda b=bare_loaded: b, lone=lambda x=lone_loaded: x)
    if other:
        ov = runtimes["openvino_fp32"]
        runtimes["openvino_other"] = SlicePredictor(
            ov.loaded, ov.cache, profile.preprocessing, other_inference, bare=ov.bare, lone=ov.lone)
    image = load_volume(ROOT / "sample-data" / "abdomen_ct.nii.gz")
    label = load_volume(ROOT / "sample-data" / "reference" / "abdomen_ct.nii.gz")
    view = SliceView.from_affine(image.affine, 2)
    window = choose_window(image.array, profile.preprocessing)
    prompts = ("lone_click", "correction_click", "new_part_click")
    times: dict[str, list[float]] = {f"{r}_{p}": [] for r in runtimes for p in prompts}
    agreement: dict[str, list[float]] = {name: [] for name in runtimes if name.startswith("openvino_")}
    ks = np.nonzero(label.array.any(axis=(0, 1)))[0]
    for k in ks[:: max(1, len(ks) // 4)][:4]:
        slice_k, labels_k = view.slice(image.array, int(k)), view.slice(label.array, int(k))
        organs = [v for v in np.unique(labels_k) if v]
        inside = np.argwhere(labels_k == organs[0])
        click = inside[len(inside) // 2][None]
        # a correction on the same organ (one more foreground click on it, a background click in a corner),
        # and, where the slice holds another organ, a foreground click on it: a new part (round 23), answered
        # alone at its own scale
        same = np.array([inside[len(inside) // 3], [2, 2]])
        elsewhere = np.argwhere(labels_k == organs[-1])
        apart = elsewhere[len(elsewhere) // 2][None] if len(organs) > 1 else None
        for r in runtimes.values():  # embeddings cached
            r.predict(slice_k, window, view.spacing, click, np.array([1]))
        for _ in range(repeats):
            masks = {}
            for name, r in runtimes.items():
                start = time.perf_counter()
                first = r.predict(slice_k, window, view.spacing, click, np.array([1]))
                times[f"{name}_lone_click"].append((time.perf_counter() - start) * 1e3)
                start = time.perf_counter()
                second = r.predict(slice_k, window, view.spacing, np.concatenate([click, same]), np.array([1, 1, 0]),
                                   None, first.low_res_logits)
                times[f"{name}_correction_click"].append((time.perf_counter() - start) * 1e3)
                masks[name] = (first.mask, second.mask)
                if apart is not None:
                    start = time.perf_counter()
                    r.predict(slice_k, window, view.spacing, np.concatenate([click, apart]), np.array([1, 1]), None,
                              first.low_res_logits)
                    times[f"{name}_new_part_click"].append((time.perf_counter() - start) * 1e3)
            for name, values in agreement.items():
                for a, b in zip(masks["torch"], masks[name], strict=True):
                    values.append(1.0 if not (a.any() or b.any()) else 2 * (a & b).sum() / (a.sum() + b.sum()))
    out: dict[str, float] = {k: statistics.median(v) for k, v in times.items() if v}
    if other:
        out["other_inference"] = other
    for prompt in (p for p in prompts if f"torch_{p}" in out):
        out[f"{prompt}_torch_over_openvino_ratio"] = round(
            out[f"torch_{prompt}"] / out[f"openvino_fp32_{prompt}"], 2)
        if f"openvino_bf16_{prompt}" in out:
            out[f"{prompt}_fp32_over_bf16_ratio"] = round(
                out[f"openvino_fp32_{prompt}"] / out[f"openvino_bf16_{prompt}"], 2)
    for name, values in agreement.items():
        tag = "" if name == "openvino_fp32" else f"{name}_"
        out[f"{tag}mask_dice_vs_torch_mean"] = round(float(np.mean(values)), 4)
        out[f"{tag}mask_dice_vs_torch_min"] = round(float(np.min(values)), 4)
    return {f"decoder_{k}": v for k, v in out.items()}


def first_click_cost(other: Path, repeats: int) -> dict[str, float | str]:
    """Median ms of a lone click through the engine on a new slice (its embeddings computed) and on a
    prefetched one, the profile's shipped adapters against ``other`` (interleaved over slices)."""
    from lib.core.engine import InteractiveSegmenter
    from lib.core.prompts import parse_prompts

    profile = load_profile(PROFILE)
    image_path = ROOT / "sample-data" / "spleen_ct.nii.gz"
    image = load_volume(image_path)
    label = load_volume(ROOT / "sample-data" / "reference" / "spleen_ct.nii.gz")
    engines = {
        "shipped": InteractiveSegmenter(profile, adapter_dir=None, device="cpu"),
        "other": InteractiveSegmenter(replace(profile, adapter_checkpoint=other.resolve()), adapter_dir=None,
                                      device="cpu"),
    }
    for engine in engines.values():
        engine.warm_up()
    ks = [int(k) for k in np.nonzero(label.array.any(axis=(0, 1)))[0]]
    times: dict[str, list[float]] = {f"{n}_{w}": [] for n in engines for w in ("new_slice", "prefetched_slice")}
    for i in range(repeats):
        k = ks[i % len(ks)]
        inside = np.argwhere(label.array[:, :, k] > 0)
        click = parse_prompts({"foreground": [[*map(int, inside[len(inside) // 2]), k]]}, image.shape)
        for name, engine in engines.items():
            engine.embeddings.clear()
            start = time.perf_counter()
            engine.segment(image, click, three_d=False)
            times[f"{name}_new_slice"].append((time.perf_counter() - start) * 1e3)
            engine.embeddings.clear()
            engine.prefetch(image_path, k)
            start = time.perf_counter()
            engine.segment(image, click, three_d=False)
            times[f"{name}_prefetched_slice"].append((time.perf_counter() - start) * 1e3)
    out: dict[str, float | str] = {f"first_click_{k}_ms": statistics.median(v) for k, v in times.items()}
    out["first_click_other_adapters"] = str(other)
    out["first_click_new_slice_other_over_shipped_ratio"] = round(
        out["first_click_other_new_slice_ms"] / out["first_click_shipped_new_slice_ms"], 2)
    out["first_click_encoders"] = " / ".join(f"{n}: {e.current().encoder_fingerprint}" for n, e in engines.items())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--decoder-only", action="store_true", help="only the decoder runtimes' comparison")
    parser.add_argument("--other-scales", default="", help="with --decoder-only: also time lone clicks with these "
                        "lone_click_scales_mm (comma-separated, e.g. 20,40,80,160) against the profile's")
    parser.add_argument("--other-inference", nargs="*", default=[], metavar="KEY=VALUE",
                        help="with --decoder-only: also time OpenVINO with these [inference] settings (TOML values, "
                             "e.g. repair_logit=0) against the profile's")
    parser.add_argument("--first-click", type=Path, metavar="OTHER.pt",
                        help="only a lone click through the engine, the shipped adapters against OTHER.pt")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.first_click is not None:
        if not args.first_click.is_file():
            raise SystemExit(f"--first-click: no file {args.first_click}")
        result = first_click_cost(args.first_click, args.repeats)
        print(json.dumps({"threads": torch.get_num_threads(), **result}, indent=2))
        return
    if args.decoder_only:
        try:
            scales = [float(v) for v in args.other_scales.split(",") if v.strip()]
            other = setting_pairs(args.other_inference, "--other-inference")
        except (ProfileError, ValueError) as e:
            raise SystemExit(str(e)) from None
        if scales:
            other["lone_click_scales_mm"] = scales
        try:
            result = decoder_runtimes(args.repeats, other)  # a bad setting stops it before anything is built
        except ProfileError as e:
            raise SystemExit(str(e)) from None
        print(json.dumps({"threads": torch.get_num_threads(), **result}, indent=2))
        return

    base = build_backbone("lite_medsam").to(device)
    model = AdaptedSam(build_backbone("lite_medsam"), AdapterSettings()).to(device)
    x = torch.rand(1, 3, 256, 256, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(f):
        def g():
            with torch.inference_mode():
                f()
            sync()

        return g

    results: dict[str, float | str | int] = {"device": str(device), "threads": torch.get_num_threads()}
    results["encoder_base_ms"] = median_ms(run(lambda: base.image_encoder(x)), args.repeats)
    results["encoder_adapted_ms"] = median_ms(run(lambda: model.encode(x)), args.repeats)

    image = load_volume(ROOT / "sample-data" / "spleen_ct.nii.gz")
    label = load_volume(ROOT / "sample-data" / "reference" / "spleen_ct.nii.gz")
    view = SliceView.from_affine(image.affine, 2)
    window = choose_window(image.array, PreprocessSettings())
    k = 13
    slice_k = view.slice(image.array, k)
    gt = view.slice(label.array, k) > 0
    box = mask_box(gt)
    inside = np.argwhere(gt)
    clicks = np.array([inside[len(inside) // 2], [2, 2]])

    cache = EmbeddingCache(512)
    predictor = SlicePredictor(LoadedModel(model, 0, "base"), cache, PreprocessSettings(), InferenceSettings(), device)
    first = predictor.predict(slice_k, window, view.spacing, box_rc=box)

    def first_prompt():
        cache.clear()
        predictor.predict(slice_k, window, view.spacing, box_rc=box)

    def cached_box():
        predictor.predict(slice_k, window, view.spacing, box_rc=box)

    def cached_refine():
        predictor.predict(slice_k, window, view.spacing, clicks, np.array([1, 0]), box, first.low_res_logits)

    results["first_prompt_ms"] = median_ms(run(first_prompt), args.repeats)
    cached_box()
    results["cached_prompt_box_ms"] = median_ms(run(cached_box), args.repeats * 3)
    results["cached_prompt_box_clicks_logits_ms"] = median_ms(run(cached_refine), args.repeats * 3)
    results.update(click_cost(slice_k, window, view.spacing, inside, device, args.repeats * 5))
    if device.type == "cpu":
        results.update(decoder_runtimes(args.repeats))
    results["first_over_cached_ratio"] = round(results["first_prompt_ms"] / results["cached_prompt_box_ms"], 1)
    results["adapted_over_base_encoder_ratio"] = round(results["encoder_adapted_ms"] / results["encoder_base_ms"], 3)
    for key, value in results.items():
        if isinstance(value, float):
            results[key] = round(value, 1) if "ratio" not in key else value
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
