"""3D results from 2D prompts: propagate a segmented slice outward, slice by slice (MedSAM style)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from .predictor import SliceResult
from .prompts import mask_box

# predict(k, box_rc, previous_low_res_logits) -> result on slice k
SlicePredict = Callable[[int, tuple[int, int, int, int], Tensor | None], SliceResult]


@dataclass(frozen=True)
class PropagationSettings:
    box_margin: int = 3  # pixels added around the previous mask's bounding box
    min_area: int = 10  # stop when the object shrinks below this many pixels
    min_iou: float = 0.0  # stop when the decoder's own IoU estimate drops below this
    with_logits: bool = False  # also feed the previous slice's logits as the mask prompt
    max_area_growth: float = 2.5  # stop when the mask suddenly grows this much (leaked into a neighbour)
    # stop when fewer than this fraction of the new mask's pixels have intensities inside the 5-95th
    # percentile range of the start slice's object (the object has ended; the box caught a neighbour)
    min_intensity_agreement: float = 0.4


def propagate_box(
    predict: SlicePredict,
    intensities: Callable[[int], np.ndarray],
    start: int,
    start_result: SliceResult,
    bounds: tuple[int, int],
    settings: PropagationSettings = PropagationSettings(),
) -> dict[int, SliceResult]:
    """Results on ``start`` and on the slices reached from it in both directions within ``bounds``
    (inclusive). Each next slice is prompted by the previous mask's box, enlarged by a few pixels.

    ``intensities(k)`` returns slice ``k`` (display orientation, raw values) for the stop test."""
    results = {start: start_result}
    if not start_result.mask.any():
        return results
    low, high = np.percentile(intensities(start)[start_result.mask], [5, 95])
    for step in (1, -1):
        previous = start_result
        k = start + step
        while bounds[0] <= k <= bounds[1]:
            box = mask_box(previous.mask, settings.box_margin)
            if box is None:
                break
            result = predict(k, box, previous.low_res_logits if settings.with_logits else None)
            area, previous_area = int(result.mask.sum()), int(previous.mask.sum())
            if area < settings.min_area or result.iou < settings.min_iou:
                break
            if previous_area and area > settings.max_area_growth * previous_area:
                break
            values = intensities(k)[result.mask]
            if np.mean((values >= low) & (values <= high)) < settings.min_intensity_agreement:
                break
            results[k] = result
            previous = result
            k += step
    return results
