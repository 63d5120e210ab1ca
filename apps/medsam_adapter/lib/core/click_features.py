"""A correction click the model ignored changes the region the image embedding says it is about.

The click adapter ignores many correction clicks (on the hippocampus train part its own answer honoured 38 %
of foreground and 17 % of background clicks); :func:`~.clicks.respect_clicks` then repairs only a small disc.
Here the click's token in the cached image embedding finds the rest of its region: the pixels near the click
whose tokens are more like the clicked one than like what the answer says is the other side (for a missed
foreground click the ring just outside the answer and the background clicks; for a held background click
the answer's interior and the foreground clicks). Decoder-free: cosines of one embedding, no model pass.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor

from .clicks import respect_clicks
from .preprocess import LetterboxFrame
from .prompts import grow_box, mask_box


class TokenSimilarity:
    """Cosine similarities between an image embedding's tokens, as maps on a slice's pixel grid."""

    def __init__(self, embedding: Tensor, frame: LetterboxFrame, img_size: int, low_res: tuple[int, int]) -> None:
        """``embedding``: (1, C, n, n) of the slice in ``frame``; ``low_res``: the decoder's logits size,
        through which token maps reach the slice like logits do."""
        tokens = embedding[0].detach().float().cpu()
        channels, self.n, _ = tokens.shape
        self.vectors = F.normalize(tokens.reshape(channels, -1), dim=0)  # (C, n * n), unit columns
        self.token_px = img_size / self.n  # model pixels per token
        self.frame = frame
        self.low_res = low_res

    @property
    def token_in_slice_px(self) -> float:
        """A token's side in slice pixels (the longer, along the axis the slice was shrunk more)."""
        return self.token_px / min(self.frame.scale_r, self.frame.scale_c)

    def tokens(self, rc: np.ndarray) -> np.ndarray:
        """Flat token indices of (N, 2) slice pixels (row, col)."""
        rc = np.asarray(rc, dtype=np.float64).reshape(-1, 2)
        tr = np.minimum(((rc[:, 0] + 0.5) * self.frame.scale_r / self.token_px).astype(np.int64), self.n - 1)
        tc = np.minimum(((rc[:, 1] + 0.5) * self.frame.scale_c / self.token_px).astype(np.int64), self.n - 1)
        return tr * self.n + tc

    def of_points(self, rc: np.ndarray) -> list[Tensor]:
        """One unit vector per slice pixel (its token's)."""
        return [self.vectors[:, i] for i in self.tokens(rc)]

    def of_region(self, mask: np.ndarray) -> list[Tensor]:
        """The mean direction of the tokens under ``mask`` (empty list for an empty mask)."""
        rows, cols = mask.shape
        tr = self.tokens(np.stack([np.arange(rows), np.zeros(rows)], 1)) // self.n  # each row's token row
        tc = self.tokens(np.stack([np.zeros(cols), np.arange(cols)], 1)) % self.n  # each column's token column
        # rows (then columns) grouped by their token: a token is under the mask if any of its pixels is
        r_starts = np.flatnonzero(np.r_[True, tr[1:] != tr[:-1]])
        c_starts = np.flatnonzero(np.r_[True, tc[1:] != tc[:-1]])
        hit = np.logical_or.reduceat(np.logical_or.reduceat(mask, r_starts, axis=0), c_starts, axis=1)
        ids = (tr[r_starts][:, None] * self.n + tc[c_starts][None, :])[hit]
        return [F.normalize(self.vectors[:, torch.as_tensor(ids)].mean(1), dim=0)] if len(ids) else []

    def contrast(self, like: list[Tensor], unlike: list[Tensor]) -> np.ndarray:
        """(rows, cols): the best cosine to ``like`` minus the best cosine to ``unlike``, per token, mapped to
        the slice grid bilinearly (as the decoder's logits are)."""
        best = (torch.stack(like) @ self.vectors).amax(0) - (torch.stack(unlike) @ self.vectors).amax(0)
        grid = best.reshape(1, 1, self.n, self.n)
        grid = F.interpolate(grid, size=self.low_res, mode="bilinear", align_corners=False)
        return self.frame.logits_to_slice(grid)[0, 0].numpy()


def feature_regions(
    mask: np.ndarray,
    foreground_rc: np.ndarray,
    background_rc: np.ndarray,
    similarity: TokenSimilarity,
    reach: float = 0.5,
    margin: float = 0.05,
    max_removal: float = 0.25,
) -> np.ndarray:
    """``mask`` with each missed foreground click's region added and each held background click's removed.

    A click's region: the connected pixels around it whose contrast (:meth:`TokenSimilarity.contrast`)
    exceeds ``margin``, within ``reach`` times the answer's equivalent radius of the click and within half
    the way to the nearest click of the other kind. A removal larger than ``max_removal`` of the answer is
    not taken (a negative click must not take the object). An empty answer is returned as it is.
    """
    out = np.asarray(mask, dtype=bool).copy()
    fg = np.asarray(foreground_rc, dtype=np.int64).reshape(-1, 2)
    bg = np.asarray(background_rc, dtype=np.int64).reshape(-1, 2)
    area = int(out.sum())
    if area == 0:
        return out
    limit = reach * np.sqrt(area / np.pi)
    ring_px = max(1, round(similarity.token_in_slice_px))

    def region(r: int, c: int, score: np.ndarray, others: np.ndarray, within: np.ndarray | None) -> np.ndarray:
        reach_px = limit
        if len(others):
            reach_px = min(reach_px, 0.5 * float(np.sqrt(((others - (r, c)) ** 2).sum(1)).min()))
        window = _rows_cols(grow_box((r, c, r, c), int(np.ceil(reach_px)), out.shape))  # nothing further is taken
        rr, cc = np.ogrid[window[0].start - r : window[0].stop - r, window[1].start - c : window[1].stop - c]
        candidate = (score[window] > margin) & (rr**2 + cc**2 <= reach_px**2)
        if within is not None:
            candidate &= within[window]
        candidate[r - window[0].start, c - window[1].start] = True
        labels, _ = ndimage.label(candidate)
        taken = np.zeros(out.shape, dtype=bool)
        taken[window] = labels == labels[r - window[0].start, c - window[1].start]
        return taken

    for r, c in fg:
        if out[r, c]:
            continue
        window = _rows_cols(mask_box(out, ring_px + 1))  # the ring lies within ring_px of the answer
        ring = np.zeros(out.shape, dtype=bool)
        ring[window] = ndimage.binary_dilation(out[window], iterations=ring_px) & ~out[window]
        unlike = similarity.of_region(ring) + similarity.of_points(bg)
        if unlike:
            out |= region(r, c, similarity.contrast(similarity.of_points([(r, c)]), unlike), bg, None)
    for r, c in bg:
        if not out[r, c]:
            continue
        window = _rows_cols(mask_box(out, 1))
        interior = np.zeros(out.shape, dtype=bool)
        interior[window] = ndimage.binary_erosion(out[window])
        like = similarity.of_region(interior if interior.any() else out) + similarity.of_points(fg)
        cut = region(r, c, similarity.contrast(similarity.of_points([(r, c)]), like), fg, out)
        if cut.sum() <= max_removal * out.sum():
            out &= ~cut
    return out


def _rows_cols(box: tuple[int, int, int, int]) -> tuple[slice, slice]:
    """An inclusive (r0, c0, r1, c1) box as the slices that index it."""
    return slice(box[0], box[2] + 1), slice(box[1], box[3] + 1)


def repair_with_features(
    mask: np.ndarray,
    foreground_rc: np.ndarray,
    background_rc: np.ndarray,
    similarity: TokenSimilarity,
    radius: float,
    reach: float = 0.5,
    margin: float = 0.05,
    max_removal: float = 0.25,
) -> np.ndarray:
    """:func:`respect_clicks` whose repairs of ignored clicks also take the clicks' feature regions
    (:func:`feature_regions`): the discs are kept, the regions added or cut, and the result respects
    every click."""
    mask = np.asarray(mask, dtype=bool)
    discs = respect_clicks(mask, foreground_rc, background_rc, radius)
    grown = feature_regions(mask, foreground_rc, background_rc, similarity, reach, margin, max_removal)
    return respect_clicks((grown | (discs & ~mask)) & ~(mask & ~discs), foreground_rc, background_rc, radius)
