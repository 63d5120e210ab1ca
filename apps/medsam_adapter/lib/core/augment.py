"""Training views of a labelled case for heads trained on a frozen encoder: the embedding cannot be
augmented, so each view is a new image that is encoded once.

A view zooms the axial plane (a larger field of view: the slice padded with its background value; a
smaller one: a window cropped around the labels) and, for CT, shifts and scales the Hounsfield units
a little (scanners and contrast phases differ). Orientation is kept: left and right labels stay apart.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .datasets import LabelledCase
from .preprocess import CT_AIR_THRESHOLD
from .volume import Volume


def _shifted(volume: Volume, array: np.ndarray, offset: tuple[int, int]) -> Volume:
    """``array`` whose voxel (0, 0, k) is ``volume``'s voxel (offset[0], offset[1], k)."""
    affine = volume.affine.copy()
    affine[:3, 3] = affine[:3, :3] @ np.array([offset[0], offset[1], 0.0]) + affine[:3, 3]
    return Volume(array, affine)


def zoomed(case: LabelledCase, factor: float, rng: np.random.Generator) -> LabelledCase:
    """The case seen with an in-plane field of view ``1 / factor`` times its own: ``factor < 1`` pads the
    plane (the image with its lowest value, the label with 0) at a random place, ``factor > 1`` crops a
    window that holds the centre of the labelled region."""
    image, label = case.image.array, case.label.array
    nx, ny = image.shape[:2]
    wx, wy = max(1, round(nx / factor)), max(1, round(ny / factor))
    if factor < 1:
        ox, oy = int(rng.integers(0, wx - nx + 1)), int(rng.integers(0, wy - ny + 1))
        big = np.full((wx, wy, image.shape[2]), image.min(), dtype=image.dtype)
        big[ox:ox + nx, oy:oy + ny] = image
        lab = np.zeros((wx, wy, label.shape[2]), dtype=label.dtype)
        lab[ox:ox + nx, oy:oy + ny] = label
        offset = (-ox, -oy)
    else:
        where = np.argwhere(label.any(axis=2))
        cx, cy = where.mean(axis=0) if len(where) else (nx / 2, ny / 2)
        x0 = int(np.clip(rng.integers(int(cx) - wx + 1, int(cx) + 1), 0, nx - wx))
        y0 = int(np.clip(rng.integers(int(cy) - wy + 1, int(cy) + 1), 0, ny - wy))
        big, lab = image[x0:x0 + wx, y0:y0 + wy], label[x0:x0 + wx, y0:y0 + wy]
        offset = (x0, y0)
    return replace(case, case_id=f"{case.case_id}@zoom{factor:.2f}",
                   image=_shifted(case.image, np.ascontiguousarray(big), offset),
                   label=_shifted(case.label, np.ascontiguousarray(lab), offset))


def hu_jittered(case: LabelledCase, shift: float, scale: float) -> LabelledCase:
    """A CT case with its tissue values moved: ``(hu - 40) * scale + 40 + shift`` above air (air stays
    air, so the CT window is still chosen). Other modalities come back unchanged."""
    image = case.image.array
    if float(image.min()) > CT_AIR_THRESHOLD:
        return case
    values = image.astype(np.float32)
    tissue = values > CT_AIR_THRESHOLD
    values[tissue] = (values[tissue] - 40.0) * scale + 40.0 + shift
    return replace(case, case_id=f"{case.case_id}@hu{shift:+.0f}x{scale:.2f}",
                   image=Volume(values, case.image.affine))


def training_views(case: LabelledCase, count: int, rng: np.random.Generator,
                   zoom: tuple[float, float] = (0.6, 1.5), hu_shift: float = 40.0,
                   hu_scale: tuple[float, float] = (0.85, 1.15)) -> list[LabelledCase]:
    """``count`` random views of ``case`` (zoom drawn log-uniformly from ``zoom``, CT values jittered)."""
    views = []
    for _ in range(count):
        factor = float(np.exp(rng.uniform(np.log(zoom[0]), np.log(zoom[1]))))
        view = zoomed(case, factor, rng)
        views.append(hu_jittered(view, float(rng.uniform(-hu_shift, hu_shift)), float(rng.uniform(*hu_scale))))
    return views
