"""What a click means, on one display-oriented slice.

- A lone foreground click is ambiguous in scale (a lesion, an organ, a whole head?). Its answer is grown
  to the object's scale by the predictor: boxes around it, doubled while the answer runs into their sides
  (:func:`side_contact`: the box was too small, the answer a fragment).
- Every answer respects the clicks: each foreground click lies inside the returned mask and each
  background click outside it (:func:`respect_clicks`). The repair is local, so objects that really
  have several parts keep them.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

Box = tuple[int, int, int, int]  # inclusive (r0, c0, r1, c1)


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
