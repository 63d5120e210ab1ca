"""A simulated annotator (interactive-segmentation literature protocol), deterministic unless given an rng.

- box: the tight bounding box of the object, optionally pushed outward by a random margin;
- first click: the most interior point of the object (maximum of the distance transform), or, for a less
  exact annotator, a random point at least a given fraction of that depth inside it (:func:`first_click`);
- next clicks: the most interior point of the largest error region, positive for a missed region,
  negative for an extra one.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .prompts import mask_box


def border_distance(region: np.ndarray) -> np.ndarray:
    """Each pixel's distance to the nearest pixel outside ``region`` (the slice's edge counts as outside)."""
    return ndimage.distance_transform_edt(np.pad(region.astype(bool), 1))[1:-1, 1:-1]


def interior_point(region: np.ndarray) -> tuple[int, int]:
    """The pixel farthest from the region's border; among equally deep pixels (e.g. the middle line of
    a rectangle), the one nearest to their centre."""
    dist = border_distance(region)
    deepest = np.argwhere(dist == dist.max())
    r, c = deepest[int(np.argmin(((deepest - deepest.mean(axis=0)) ** 2).sum(axis=1)))]
    return int(r), int(c)


def first_click(region: np.ndarray, depth: float = 1.0, rng: np.random.Generator | None = None) -> tuple[int, int]:
    """An annotator's first click on ``region``: at ``depth`` 1 (or without ``rng``) the most interior point
    (:func:`interior_point`); below 1 a random pixel whose distance from the border is at least ``depth``
    times the deepest pixel's (0.5: anywhere in the inner half of the object's depth; never on its border)."""
    if rng is None or depth >= 1.0:
        return interior_point(region)
    dist = border_distance(region)
    candidates = np.argwhere(dist >= max(1.0, depth * dist.max()))
    r, c = candidates[rng.integers(len(candidates))]
    return int(r), int(c)


def largest_error_click(prediction: np.ndarray, target: np.ndarray) -> tuple[int, int, bool] | None:
    """(row, col, positive) at the interior of the largest false-negative or false-positive region."""
    best = None
    for positive, error in ((True, target & ~prediction), (False, prediction & ~target)):
        if not error.any():
            continue
        components, n = ndimage.label(error)
        sizes = np.bincount(components.ravel())[1:]
        largest = int(np.argmax(sizes)) + 1
        if best is None or sizes[largest - 1] > best[0]:
            best = (int(sizes[largest - 1]), components == largest, positive)
    if best is None:
        return None
    r, c = interior_point(best[1])
    return r, c, best[2]


def random_interior_point(target: np.ndarray, rng: np.random.Generator, min_depth: float = 2.0) -> tuple[int, int]:
    """A random object pixel at least ``min_depth`` from its border when there is one."""
    dist = border_distance(target)
    candidates = np.argwhere(dist >= min(min_depth, dist.max()))
    r, c = candidates[rng.integers(len(candidates))]
    return int(r), int(c)


def jittered_box(target: np.ndarray, rng: np.random.Generator | None, max_jitter: int) -> tuple[int, int, int, int]:
    """The object's tight box, each side pushed outward by 0..max_jitter pixels (none without rng)."""
    r0, c0, r1, c1 = mask_box(target)
    if rng is None or max_jitter <= 0:
        return r0, c0, r1, c1
    h, w = target.shape
    d = rng.integers(0, max_jitter + 1, size=4)
    return max(r0 - d[0], 0), max(c0 - d[1], 0), min(r1 + d[2], h - 1), min(c1 + d[3], w - 1)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / total
