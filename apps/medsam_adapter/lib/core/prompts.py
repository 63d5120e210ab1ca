"""Prompts as clients send them (voxel indices of the stored image), validated and normalised.

- points: ``[[i, j, k], ...]`` integer voxel indices;
- ROI (3D Slicer): ``[i0, i1, j0, j1, k0, k1]`` with min/max possibly swapped; inclusive indices.
Every problem raises :class:`PromptError` with a message meant for the user.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


class PromptError(ValueError):
    """The request's prompts are malformed or do not fit the image."""


@dataclass(frozen=True)
class Roi:
    lo: tuple[int, int, int]  # inclusive
    hi: tuple[int, int, int]  # inclusive

    def in_plane(self, axis: int) -> tuple[tuple[int, int], tuple[int, int]]:
        a, b = [d for d in range(3) if d != axis]
        return (self.lo[a], self.lo[b]), (self.hi[a], self.hi[b])


@dataclass(frozen=True)
class VoxelPrompts:
    foreground: np.ndarray  # (N, 3) int64
    background: np.ndarray  # (M, 3) int64
    roi: Roi | None

    @property
    def empty(self) -> bool:
        return self.roi is None and len(self.foreground) == 0 and len(self.background) == 0


def _number(v: object, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise PromptError(f"{what}: expected a number, got {type(v).__name__} {v!r}")
    if not math.isfinite(v):
        raise PromptError(f"{what}: expected a finite number, got {v!r}")
    return float(v)


def parse_points(value: object, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """``[[i, j, k], ...]`` -> (N, 3) int64, every point inside the volume."""
    if value is None or value == []:
        return np.zeros((0, 3), dtype=np.int64)
    if not isinstance(value, (list, tuple)):
        raise PromptError(f"'{name}' must be a list of [i, j, k] voxel indices, got {type(value).__name__}")
    if len(value) > 1000:
        raise PromptError(f"'{name}' has {len(value)} points; at most 1000 are accepted")
    points = []
    for n, p in enumerate(value):
        if not isinstance(p, (list, tuple)) or len(p) != 3:
            raise PromptError(f"'{name}'[{n}] must be [i, j, k], got {p!r}")
        ijk = [_number(x, f"'{name}'[{n}]") for x in p]
        if any(abs(x - round(x)) > 1e-6 for x in ijk):
            raise PromptError(f"'{name}'[{n}] = {p!r}: voxel indices must be integers")
        ijk = [int(round(x)) for x in ijk]
        if any(x < 0 or x >= s for x, s in zip(ijk, shape, strict=True)):
            raise PromptError(f"'{name}'[{n}] = {ijk} is outside the image (shape {list(shape)})")
        points.append(ijk)
    return np.asarray(points, dtype=np.int64).reshape(-1, 3)


def parse_roi(value: object, shape: tuple[int, ...], axis: int = 2) -> Roi | None:
    """Slicer's ``roi`` -> :class:`Roi` clipped to the volume; rejects ROIs with no in-plane extent."""
    if value is None or value == []:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 6:
        raise PromptError(f"'roi' must be [i0, i1, j0, j1, k0, k1], got {value!r}")
    v = [_number(x, "'roi'") for x in value]
    lo, hi = [], []
    for d in range(3):
        a, b = sorted((v[2 * d], v[2 * d + 1]))
        a, b = int(math.floor(a + 1e-6)), int(math.ceil(b - 1e-6))
        if b < 0 or a > shape[d] - 1:
            raise PromptError(f"'roi' {value!r} lies outside the image (shape {list(shape)})")
        lo.append(max(a, 0))
        hi.append(min(b, shape[d] - 1))
    roi = Roi(tuple(lo), tuple(hi))
    (a0, b0), (a1, b1) = roi.in_plane(axis)
    if a1 <= a0 or b1 <= b0:
        raise PromptError(f"'roi' {value!r} is degenerate: it needs an extent of at least 2 voxels in the slice plane")
    return roi


def parse_prompts(request: dict, shape: tuple[int, ...], axis: int = 2) -> VoxelPrompts:
    return VoxelPrompts(
        foreground=parse_points(request.get("foreground"), "foreground", shape),
        background=parse_points(request.get("background"), "background", shape),
        roi=parse_roi(request.get("roi"), shape, axis),
    )


def parse_slice(value: object, shape: tuple[int, ...], axis: int) -> int | None:
    if value is None or value == "":
        return None
    k = _number(value, "'slice'")
    if k != int(k) or not 0 <= k < shape[axis]:
        raise PromptError(f"'slice' = {value!r} must be an integer in [0, {shape[axis] - 1}]")
    return int(k)


def choose_slice(prompts: VoxelPrompts, requested: int | None, axis: int) -> int:
    """The slice a 2D prompt acts on: the request's ``slice``, else the last click's, else the ROI's middle."""
    if requested is not None:
        return requested
    points = np.concatenate([prompts.foreground, prompts.background])
    if len(points):
        return int(points[-1, axis])
    if prompts.roi is not None:
        return (prompts.roi.lo[axis] + prompts.roi.hi[axis]) // 2
    raise PromptError("no prompt given: send 'foreground'/'background' clicks or a 'roi' box")


def points_on_slice(points: np.ndarray, k: int, axis: int) -> np.ndarray:
    return points[points[:, axis] == k] if len(points) else points


def mask_box(mask: np.ndarray, margin: float | tuple[float, float] = 0) -> tuple[int, int, int, int] | None:
    """Inclusive bounding box (r0, c0, r1, c1) of a 2D mask, enlarged by ``margin`` (:func:`grow_box`) and
    clipped; None for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return grow_box((int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1])), margin, mask.shape)


def grow_box(
    box: tuple[int, int, int, int], margin: float | tuple[float, float], shape: tuple[int, ...]
) -> tuple[int, int, int, int]:
    """An inclusive box (r0, c0, r1, c1) enlarged by ``margin`` pixels (one for both axes, or (rows, cols);
    a fraction rounds outward) and clipped to a 2D ``shape``."""
    r0, c0, r1, c1 = box
    mr, mc = margin if isinstance(margin, tuple) else (margin, margin)
    return (max(math.floor(r0 - mr), 0), max(math.floor(c0 - mc), 0),
            min(math.ceil(r1 + mr), shape[0] - 1), min(math.ceil(c1 + mc), shape[1] - 1))
