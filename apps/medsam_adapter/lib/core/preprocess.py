"""Intensity normalisation and the letterbox frame between a slice and the model input.

Conventions (pinned by tests):
- a 2D slice is indexed ``[row, col]``; SAM coordinates are ``(x, y) = (col, row)``;
- pixel ``(r, c)`` of the slice covers ``[r, r+1) x [c, c+1)``; its centre maps to the model frame by
  ``(r + 0.5) * scale_r`` (the prompt encoder adds the 0.5 back), so mapping is exact and invertible;
- the slice is resized so its longest *physical* side fills ``img_size`` and padded at bottom/right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .config import PreprocessSettings

# (level, width) in HU
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40.0, 400.0),
    "lung": (-160.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
CT_AIR_THRESHOLD = -500.0  # a volume whose minimum is below this is taken as CT in Hounsfield units


@dataclass(frozen=True)
class IntensityWindow:
    """Maps raw intensities linearly to [0, 1], clipping outside [low, high]."""

    low: float
    high: float
    source: str

    def apply(self, values: np.ndarray) -> np.ndarray:
        scale = 1.0 / max(self.high - self.low, 1e-6)
        return np.clip((values.astype(np.float32) - self.low) * scale, 0.0, 1.0)

    def key(self) -> str:
        return f"{self.source}:{self.low:.4g}:{self.high:.4g}"


def ct_window(name: str) -> IntensityWindow:
    if name not in CT_WINDOWS:
        raise ValueError(f"unknown CT window {name!r}; known: {sorted(CT_WINDOWS)}")
    level, width = CT_WINDOWS[name]
    return IntensityWindow(level - width / 2, level + width / 2, f"ct-{name}")


def choose_window(volume: np.ndarray, settings: PreprocessSettings, override: str | None = None) -> IntensityWindow:
    """Intensity window for a whole volume (computed once per image, so slices are consistent).

    ``override``: a CT window name, "percentile", "minmax", "ct" or "auto" (per request).
    """
    mode = override or settings.intensity
    if mode in CT_WINDOWS:
        return ct_window(mode)
    if mode == "auto":
        mode = "ct" if float(np.min(volume)) <= CT_AIR_THRESHOLD else "percentile"
    if mode == "ct":
        return ct_window(settings.ct_window)
    if mode == "minmax":
        return IntensityWindow(float(np.min(volume)), float(np.max(volume)), "minmax")
    if mode == "percentile":
        values = volume[volume != 0]
        if values.size == 0:
            values = volume.reshape(-1)
        lo, hi = np.percentile(values, settings.percentiles)
        if hi <= lo:
            lo, hi = float(np.min(values)), float(np.max(values)) + 1e-3
        return IntensityWindow(float(lo), float(hi), "percentile")
    raise ValueError(f"unknown intensity mode {mode!r}; use auto, ct, percentile, minmax or {sorted(CT_WINDOWS)}")


def normalize_slice(slice2d: np.ndarray, window: IntensityWindow, per_slice_minmax: bool) -> np.ndarray:
    """Window a 2D slice to [0, 1]; optionally stretch the windowed slice to its own min/max."""
    out = window.apply(slice2d)
    if per_slice_minmax:
        lo, hi = float(out.min()), float(out.max())
        out = (out - lo) / max(hi - lo, 1e-8)
    return out


@dataclass(frozen=True)
class LetterboxFrame:
    """Geometry of one slice (rows x cols, pixel spacing) inside the square model input."""

    rows: int
    cols: int
    img_size: int
    scale_r: float  # model pixels per slice row
    scale_c: float  # model pixels per slice column

    @classmethod
    def fit(cls, shape: tuple[int, int], img_size: int, spacing: tuple[float, float] = (1.0, 1.0)) -> LetterboxFrame:
        rows, cols = int(shape[0]), int(shape[1])
        if rows < 1 or cols < 1:
            raise ValueError(f"empty slice of shape {shape}")
        sr, sc = (float(abs(s)) if s and math.isfinite(s) else 1.0 for s in spacing)
        extent = max(rows * sr, cols * sc)
        return cls(rows, cols, img_size, img_size * sr / extent, img_size * sc / extent)

    @property
    def resized(self) -> tuple[int, int]:
        """Rows and columns the slice occupies in the model frame (top-left corner)."""
        return (
            min(self.img_size, max(1, round(self.rows * self.scale_r))),
            min(self.img_size, max(1, round(self.cols * self.scale_c))),
        )

    def image_to_model(self, image01: np.ndarray) -> Tensor:
        """(rows, cols) image in [0, 1] -> (1, 3, S, S) model input, resized and zero-padded."""
        h, w = self.resized
        t = torch.from_numpy(np.ascontiguousarray(image01, dtype=np.float32))[None, None]
        if (h, w) != (self.rows, self.cols):
            t = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        t = F.pad(t, (0, self.img_size - w, 0, self.img_size - h))
        return t.expand(1, 3, self.img_size, self.img_size).contiguous()

    def points_to_model(self, rc: np.ndarray) -> np.ndarray:
        """(N, 2) pixel indices (row, col) -> (N, 2) SAM coordinates (x, y) in the model frame."""
        rc = np.asarray(rc, dtype=np.float64).reshape(-1, 2)
        return np.stack([(rc[:, 1] + 0.5) * self.scale_c - 0.5, (rc[:, 0] + 0.5) * self.scale_r - 0.5], axis=1)

    def points_from_model(self, xy: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`points_to_model` (continuous pixel indices)."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        return np.stack([(xy[:, 1] + 0.5) / self.scale_r - 0.5, (xy[:, 0] + 0.5) / self.scale_c - 0.5], axis=1)

    def box_to_model(self, r0: int, c0: int, r1: int, c1: int) -> np.ndarray:
        """Inclusive pixel box -> SAM box (x0, y0, x1, y1) through the corner pixels' centres."""
        (x0, y0), (x1, y1) = self.points_to_model(np.array([[r0, c0], [r1, c1]]))
        return np.array([x0, y0, x1, y1])

    def logits_to_slice(self, low_res: Tensor) -> Tensor:
        """(B, C, h, w) low-res logits -> (B, C, rows, cols) logits on the slice grid."""
        h, w = self.resized
        up = F.interpolate(low_res, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        up = up[..., :h, :w]
        return F.interpolate(up, size=(self.rows, self.cols), mode="bilinear", align_corners=False)

    def low_res_extent(self, low_res: tuple[int, int]) -> tuple[int, int]:
        """Rows and columns the slice occupies in the low-res frame (the same share as in the model frame)."""
        h, w = self.resized
        return max(1, round(h * low_res[0] / self.img_size)), max(1, round(w * low_res[1] / self.img_size))

    def labels_to_low_res(self, labels: np.ndarray, low_res: tuple[int, int]) -> np.ndarray:
        """A (rows, cols) label map -> (h, w) label map in the low-res frame (nearest neighbour, padded 0)."""
        lh, lw = low_res
        t = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32))[None, None]
        sh, sw = self.low_res_extent(low_res)
        t = F.interpolate(t, size=(sh, sw), mode="nearest-exact")
        t = F.pad(t, (0, lw - sw, 0, lh - sh))
        return t[0, 0].to(torch.int64).numpy()


def model_input(image: np.ndarray, window: IntensityWindow, per_slice_minmax: bool, frame: LetterboxFrame) -> Tensor:
    """A raw slice (rows, cols) -> (1, 3, S, S), or a slice stack (D, rows, cols) -> (1, D, 3, S, S),
    each slice normalised on its own."""
    if image.ndim == 2:
        return frame.image_to_model(normalize_slice(image, window, per_slice_minmax))
    return torch.stack([frame.image_to_model(normalize_slice(s, window, per_slice_minmax)) for s in image], dim=1)
