"""Evaluation of interactive segmentation: a deterministic simulated annotator run through any
segmentation backend (in-process or a live server), and the metrics it reports.

Protocol (the same for every method):
- box: the structure's tight bounding box on the slice, and a jittered variant (each side pushed
  outward by a seeded random 0..``box_jitter`` of the box's extent);
- clicks: the first at the most interior point of the structure (distance-transform maximum; with
  ``first_click_depth`` < 1 a seeded random point at least that fraction of its depth inside), each next
  one at the most interior point of the largest error region (positive for a miss, negative for an
  extra region), the previous logits fed back as the product does, up to ``max_clicks``;
- 3D: one tight box on the middle labelled slice of the structure, propagated through the volume;
  Dice and normalised surface Dice (NSD) at ``nsd_tolerance_mm`` in the volume's own spacing.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np
import torch
from monai.metrics import compute_surface_dice

from .annotator import dice, first_click, largest_error_click
from .datasets import LabelledCase


@dataclass(frozen=True)
class EvalSettings:
    max_clicks: int = 20
    click_checkpoints: tuple[int, ...] = (1, 3, 5)
    noc_targets: tuple[float, ...] = (0.85, 0.90)
    box_jitter: float = 0.1  # fraction of the box's extent, per side, outward
    first_click_depth: float = 1.0  # 1: the first click at the deepest point; 0.5: anywhere at half its depth
    seed: int = 0
    max_slices_per_structure: int = 5
    min_pixels: int = 10
    three_d: bool = True
    nsd_tolerance_mm: float = 2.0

    def __post_init__(self) -> None:
        if not 0.0 < self.first_click_depth <= 1.0:
            raise ValueError(f"first_click_depth must be in (0, 1], got {self.first_click_depth}")


class SegmentationBackend(Protocol):
    """Anything that answers a prompt request like the product's ``medsam_2d``/``medsam_3d`` tasks."""

    def segment(
        self, case: LabelledCase, request: dict, three_d: bool
    ) -> tuple[np.ndarray, dict[str, float]]:  # (label volume in the case's grid, latency in ms)
        ...


# -- metrics --------------------------------------------------------------------------------------
def clicks_to_reach(dices: Sequence[float], target: float, cap: int) -> tuple[int, bool]:
    """Number of clicks (NoC) until Dice >= ``target``: (clicks, reached). Not reached -> (cap, False)."""
    for n, d in enumerate(dices[:cap], start=1):
        if d >= target:
            return n, True
    return cap, False


def surface_dice(pred: np.ndarray, target: np.ndarray, spacing: Sequence[float], tolerance_mm: float) -> float:
    """Normalised surface Dice at ``tolerance_mm`` (MONAI's implementation); 1 when both are empty."""
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    if not pred.any() and not target.any():
        return 1.0
    if not pred.any() or not target.any():
        return 0.0

    def onehot(m: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(m)
        return torch.stack([~t, t])[None].float()

    value = compute_surface_dice(
        onehot(pred), onehot(target), [tolerance_mm], include_background=False, spacing=list(map(float, spacing))
    )
    return float(value.reshape(-1)[0])


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(np.linalg.norm(affine[:3, d])) for d in range(3))  # type: ignore[return-value]


def jittered_roi(mask: np.ndarray, k: int, rng: np.random.Generator | None, jitter: float) -> list[int]:
    """Slicer-style ROI [i0, i1, j0, j1, k, k] around ``mask`` (i, j plane), optionally jittered outward."""
    ii, jj = np.nonzero(mask)
    i0, i1, j0, j1 = int(ii.min()), int(ii.max()), int(jj.min()), int(jj.max())
    if rng is not None and jitter > 0:
        di, dj = (i1 - i0 + 1) * jitter, (j1 - j0 + 1) * jitter
        d = rng.uniform(0, 1, size=4) * np.array([di, di, dj, dj])
        h, w = mask.shape
        i0, i1 = max(0, i0 - round(d[0])), min(h - 1, i1 + round(d[1]))
        j0, j1 = max(0, j0 - round(d[2])), min(w - 1, j1 + round(d[3]))
    return [i0, i1, j0, j1, k, k]


def chosen_slices(present: np.ndarray, limit: int) -> list[int]:
    """Up to ``limit`` evenly spaced slice indices from ``present`` (sorted), always including the middle."""
    present = np.asarray(present)
    if len(present) <= limit:
        return [int(k) for k in present]
    pick = np.linspace(0, len(present) - 1, limit).round().astype(int)
    return sorted({int(present[i]) for i in pick})


def _seed(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


# -- sessions -------------------------------------------------------------------------------------
@dataclass
class SliceRecord:
    case: str
    structure: str
    slice: int
    pixels: int
    box_dice: float
    jittered_box_dice: float
    click_dice: list[float]  # Dice after click 1..max_clicks
    noc: dict[str, int] = field(default_factory=dict)
    noc_reached: dict[str, bool] = field(default_factory=dict)
    latency_ms: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class VolumeRecord:
    case: str
    structure: str
    seed_slice: int
    dice: float
    nsd: float
    seconds: float


def _plane(volume: np.ndarray, k: int) -> np.ndarray:
    return volume[:, :, k]


def evaluate_slice(
    backend: SegmentationBackend, case: LabelledCase, name: str, gt: np.ndarray, k: int, settings: EvalSettings,
    session: str,
) -> SliceRecord:
    """Box, jittered box and a click session on one slice of one structure."""
    latency: dict[str, list[float]] = {"first_encoder": [], "decoder": [], "end_to_end": []}

    def run(request: dict) -> np.ndarray:
        start = time.perf_counter()
        label, ms = backend.segment(case, {"label": name, **request}, False)
        latency["end_to_end"].append((time.perf_counter() - start) * 1e3)
        if "decoder" in ms:
            latency["decoder"].append(ms["decoder"])
        if ms.get("encoder"):
            latency["first_encoder"].append(ms["encoder"])
        return _plane(label, k) > 0

    box = dice(run({"roi": jittered_roi(gt, k, None, 0), "client_id": f"{session}-box"}), gt)
    rng = np.random.default_rng(settings.seed + _seed(case.case_id, name, k))
    jbox = dice(run({"roi": jittered_roi(gt, k, rng, settings.box_jitter), "client_id": f"{session}-jbox"}), gt)
    fg: list[list[int]] = []
    bg: list[list[int]] = []
    r, c = first_click(gt, settings.first_click_depth, rng)
    fg.append([r, c, k])
    dices: list[float] = []
    for n in range(settings.max_clicks):
        pred = run({"foreground": fg, "background": bg, "slice": k, "client_id": f"{session}-clicks",
                    "reset_state": n == 0})
        dices.append(dice(pred, gt))
        nxt = largest_error_click(pred, gt)
        if nxt is None:  # perfect: later clicks change nothing
            dices += [dices[-1]] * (settings.max_clicks - len(dices))
            break
        (fg if nxt[2] else bg).append([nxt[0], nxt[1], k])
    record = SliceRecord(case.case_id, name, k, int(gt.sum()), box, jbox, dices, latency_ms=latency)
    for target in settings.noc_targets:
        key = f"noc{round(target * 100)}"
        record.noc[key], record.noc_reached[key] = clicks_to_reach(dices, target, settings.max_clicks)
    return record


def evaluate_volume(
    backend: SegmentationBackend, case: LabelledCase, name: str, target: np.ndarray, slices: Sequence[int],
    settings: EvalSettings, session: str,
) -> VolumeRecord:
    """One tight box on the structure's middle labelled slice, propagated in 3D."""
    k = int(slices[len(slices) // 2])
    start = time.perf_counter()
    label, _ = backend.segment(
        case, {"label": name, "roi": jittered_roi(target[:, :, k], k, None, 0), "client_id": f"{session}-3d"}, True
    )
    seconds = time.perf_counter() - start
    pred = label > 0
    spacing = voxel_spacing(case.image.affine)
    return VolumeRecord(case.case_id, name, k, dice(pred, target), surface_dice(pred, target, spacing,
                                                                                 settings.nsd_tolerance_mm), seconds)


def evaluate_cases(
    backend: SegmentationBackend,
    cases: Sequence[LabelledCase],
    settings: EvalSettings,
    structures: Sequence[str | int] | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[SliceRecord], list[VolumeRecord]]:
    """Every requested structure of every case: slice sessions, and 3D propagation for volumes."""
    slice_records: list[SliceRecord] = []
    volume_records: list[VolumeRecord] = []
    for case in cases:
        values = case.label.array
        for value, name in case.structures(structures).items():
            target = values == value
            areas = target.sum(axis=(0, 1))
            present = np.flatnonzero(areas >= settings.min_pixels)
            if len(present) == 0:
                continue
            session = f"eval-{case.case_id}-{name}"
            for k in chosen_slices(present, settings.max_slices_per_structure):
                slice_records.append(evaluate_slice(backend, case, name, target[:, :, k], k, settings, session))
            if settings.three_d and values.shape[2] > 1 and len(present) > 1:
                volume_records.append(evaluate_volume(backend, case, name, target, present, settings, session))
            if progress:
                progress(f"{case.case_id}/{name}: {len(present)} slices")
    return slice_records, volume_records


# -- summaries ------------------------------------------------------------------------------------
def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def summarize(
    slices: Sequence[SliceRecord], volumes: Sequence[VolumeRecord], settings: EvalSettings
) -> dict[str, float | int]:
    """Overall means: box Dice, Dice after the checkpoint clicks, mean NoC and failure rates, 3D Dice/NSD,
    and latency medians (first call per slice: encoder; every click: decoder and end to end)."""
    out: dict[str, float | int] = {"slices": len(slices), "volumes": len(volumes)}
    if slices:
        out["box_dice"] = _mean([r.box_dice for r in slices])
        out["jittered_box_dice"] = _mean([r.jittered_box_dice for r in slices])
        for n in settings.click_checkpoints:
            out[f"click{n}_dice"] = _mean([r.click_dice[min(n, len(r.click_dice)) - 1] for r in slices])
        for key in slices[0].noc:
            out[key] = _mean([r.noc[key] for r in slices])
            out[f"{key}_failure_rate"] = _mean([0.0 if r.noc_reached[key] else 1.0 for r in slices])
        for kind in ("first_encoder", "decoder", "end_to_end"):
            values = [v for r in slices for v in r.latency_ms.get(kind, [])]
            if values:
                out[f"{kind}_ms_median"] = float(np.median(values))
                out[f"{kind}_ms_p90"] = float(np.percentile(values, 90))
    if volumes:
        out["dice_3d"] = _mean([v.dice for v in volumes])
        out[f"nsd_3d_{settings.nsd_tolerance_mm:g}mm"] = _mean([v.nsd for v in volumes])
        out["seconds_3d_median"] = float(np.median([v.seconds for v in volumes]))
    return out


def dice_curve(slices: Sequence[SliceRecord]) -> list[float]:
    """Mean Dice after 1..max clicks."""
    if not slices:
        return []
    return np.mean(np.array([r.click_dice for r in slices]), axis=0).tolist()


def per_case(slices: Sequence[SliceRecord], volumes: Sequence[VolumeRecord], checkpoint: int = 5) -> dict[str, dict]:
    """Per case: box Dice, Dice after ``checkpoint`` clicks, 3D Dice."""
    out: dict[str, dict] = {}
    for case in dict.fromkeys(r.case for r in slices):
        rows = [r for r in slices if r.case == case]
        out[case] = {
            "box_dice": _mean([r.box_dice for r in rows]),
            f"click{checkpoint}_dice": _mean([r.click_dice[min(checkpoint, len(r.click_dice)) - 1] for r in rows]),
            "dice_3d": _mean([v.dice for v in volumes if v.case == case]),
        }
    return out


def records_as_dicts(slices: Sequence[SliceRecord], volumes: Sequence[VolumeRecord]) -> dict[str, list[dict]]:
    return {"slices": [asdict(r) for r in slices], "volumes": [asdict(v) for v in volumes]}
