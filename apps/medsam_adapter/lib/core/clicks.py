"""What a click means, on one display-oriented slice.

- A lone foreground click is ambiguous in scale (a lesion, an organ, a whole head?). It is tried with
  boxes of several physical sizes centred on it, and the candidate the model itself rates best
  (predicted IoU, penalised when the mask runs into its box's sides: the box was too small) is kept.
- Every answer respects the clicks: each foreground click lies inside the returned mask and each
  background click outside it (:func:`respect_clicks`). The repair is local, so objects that really
  have several parts keep them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

Box = tuple[int, int, int, int]  # inclusive (r0, c0, r1, c1)


def boxes_around(
    point_rc: Sequence[float], spacing: tuple[float, float], shape: tuple[int, int], sizes_mm: Sequence[float]
) -> list[Box]:
    """Square boxes of side ``sizes_mm`` (physical) centred on a click, clipped to the slice; sizes that
    clip to the same box as a smaller one are dropped."""
    r, c = float(point_rc[0]), float(point_rc[1])
    rows, cols = shape
    out: list[Box] = []
    for size in sorted(sizes_mm):
        hr, hc = size / 2 / max(spacing[0], 1e-6), size / 2 / max(spacing[1], 1e-6)
        box = (
            max(0, int(np.floor(r - hr))),
            max(0, int(np.floor(c - hc))),
            min(rows - 1, int(np.ceil(r + hr))),
            min(cols - 1, int(np.ceil(c + hc))),
        )
        if box[2] - box[0] < 2 or box[3] - box[1] < 2:
            continue
        if box not in out:
            out.append(box)
    return out


def side_contact(mask: np.ndarray, box: Box) -> float:
    """Share of a box's sides (those inside the slice, not on its border) that the mask touches."""
    r0, c0, r1, c1 = box
    rows, cols = mask.shape
    touched = total = 0
    for inside, line in (
        (r0 > 0, mask[r0, c0 : c1 + 1]),
        (r1 < rows - 1, mask[r1, c0 : c1 + 1]),
        (c0 > 0, mask[r0 : r1 + 1, c0]),
        (c1 < cols - 1, mask[r0 : r1 + 1, c1]),
    ):
        if inside:
            touched += int(line.sum())
            total += line.size
    return touched / total if total else 0.0


def respect_clicks(
    mask: np.ndarray, foreground_rc: np.ndarray, background_rc: np.ndarray, radius: float = 2.0
) -> np.ndarray:
    """``mask`` changed as little as possible so that every foreground click is inside and every
    background click outside it (a pixel clicked both ways stays background).

    A missed foreground click gets a disc of ``radius`` pixels (never reaching past half the way to a
    background click). A background click inside the mask removes its connected component when that holds
    no foreground click (a separate wrong blob); otherwise the largest disc around the click that stays
    inside the mask, never reaching past half the way to a foreground click (a leak is cut where the user
    said). Other parts of the mask are kept, so objects with several parts keep them.
    """
    out = np.asarray(mask, dtype=bool).copy()
    fg = np.asarray(foreground_rc, dtype=np.int64).reshape(-1, 2)
    bg = np.asarray(background_rc, dtype=np.int64).reshape(-1, 2)
    rows, cols = out.shape
    rr, cc = np.ogrid[0:rows, 0:cols]

    def nearest(points: np.ndarray, r: int, c: int) -> float:
        return float(np.sqrt(((points - (r, c)) ** 2).sum(1)).min()) if len(points) else np.inf

    for r, c in fg:
        if not out[r, c]:
            reach = min(radius, 0.5 * nearest(bg, r, c))
            out |= (rr - r) ** 2 + (cc - c) ** 2 <= reach**2
    if len(bg) and out[bg[:, 0], bg[:, 1]].any():
        components, _ = ndimage.label(out)
        depth = ndimage.distance_transform_edt(np.pad(out, 1))[1:-1, 1:-1]
        for r, c in bg:
            comp = components[r, c]
            if comp == 0:
                continue
            inside = np.array([p for p in fg if components[p[0], p[1]] == comp]).reshape(-1, 2)
            if len(inside) == 0:
                out[components == comp] = False
                continue
            reach = min(float(depth[r, c]), 0.5 * nearest(inside, r, c))
            out &= (rr - r) ** 2 + (cc - c) ** 2 > reach**2
    if len(bg):
        out[bg[:, 0], bg[:, 1]] = False
    if len(fg):
        keep = np.ones(len(fg), dtype=bool)
        if len(bg):  # a pixel clicked both ways stays background
            keep = ~(fg[:, None, :] == bg[None, :, :]).all(-1).any(1)
        out[fg[keep, 0], fg[keep, 1]] = True
    return out
