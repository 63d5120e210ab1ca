"""In-process speed of the model core (no server): encoder per slice, decoder per prompt, cache gain.

    .venv/bin/python benchmarks/bench_predictor.py [--repeats 7] [--device cpu]

Prints medians over repeats, all measured in this one process so ratios are comparable:
- base LiteMedSAM encoder vs the adapted encoder (adapters' cost),
- decoder per prompt (box; box + clicks + previous logits),
- first prompt on a slice (encoder + decoder) vs a further prompt on the same slice (cached),
- a click with fed-back logits on a cached slice: bare LiteMedSAM vs the shipped click adapter
  (interleaved repeats, the adapters' cost per click).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "apps" / "medsam_adapter"))

from lib.core.backbones import build_backbone  # noqa: E402
from lib.core.cache import EmbeddingCache  # noqa: E402
from lib.core.checkpoint import AdapterCheckpoint  # noqa: E402
from lib.core.config import AdapterSettings, InferenceSettings, PreprocessSettings  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

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
    results["first_over_cached_ratio"] = round(results["first_prompt_ms"] / results["cached_prompt_box_ms"], 1)
    results["adapted_over_base_encoder_ratio"] = round(results["encoder_adapted_ms"] / results["encoder_base_ms"], 3)
    for key, value in results.items():
        if isinstance(value, float):
            results[key] = round(value, 1) if "ratio" not in key else value
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
