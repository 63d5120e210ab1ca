"""The answers a served session shows, reproduced in the decoder's low-res frame for training.

Inference (:class:`~.predictor.SlicePredictor` with the engine's routing) does not show the adapter's own
answer to every prompt: a box alone is answered by the bare base model, a lone click at its object's
scale (the bare model's answers to boxes around it, and with ``lone_click_recentre`` to those boxes moved
onto their answers, compete with the click alone), and a correction click
changes the previous answer only where it was wrong. A simulated annotator that sees these answers trains
the adapter on the sessions it will actually serve: refining masks it did not produce itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .clicks import boxes_at_scales, local_correction, pick_scale, recentred_boxes
from .config import InferenceSettings
from .model import AdaptedSam


def low_res_to_model(rc: np.ndarray, factor: float) -> np.ndarray:
    """Low-res (row, col) pixel indices -> model-frame SAM (x, y) through the pixels' centres."""
    rc = np.asarray(rc, dtype=np.float64).reshape(-1, 2)
    return np.stack([(rc[:, 1] + 0.5) * factor - 0.5, (rc[:, 0] + 0.5) * factor - 0.5], axis=1)


@dataclass(frozen=True)
class LowResGeometry:
    """Where a slice lies in the low-res frame and how large its pixels are."""

    extent: tuple[int, int]  # rows, cols the slice occupies (top-left; the rest is padding)
    mm_per_pixel: float  # physical side of a low-res pixel (the letterbox frame is isotropic)
    slice_pixels: float  # slice pixels per low-res pixel, per axis


class ServedAnswers:
    """What inference shows for a box alone, a lone click and a correction, given the bare base model
    (``bare``: the same backbone without adapters) and the profile's inference settings."""

    def __init__(self, bare: AdaptedSam, inference: InferenceSettings) -> None:
        self.bare = bare
        self.inference = inference
        self.factor = bare.img_size / bare.low_res_size[1]

    def model_boxes(self, boxes: list[tuple[int, int, int, int]]) -> Tensor:
        """Inclusive low-res (r0, c0, r1, c1) boxes -> (B, 4) SAM boxes (x0, y0, x1, y1) in the model frame."""
        corners = low_res_to_model(np.array(boxes, dtype=np.float64).reshape(-1, 2), self.factor).reshape(-1, 4)
        return torch.as_tensor(corners, dtype=torch.float32, device=self.bare.device)

    @torch.no_grad()
    def box(self, embedding: Tensor, boxes: Tensor) -> Tensor:
        """The bare model's answers (B, 1, h, w) to boxes alone, one embedding per item."""
        return torch.cat([self.bare.decode(embedding[b : b + 1], boxes=boxes[b : b + 1]).low_res_logits
                          for b in range(len(boxes))])

    @torch.no_grad()
    def lone_click(
        self, embedding: Tensor, alone: Tensor, click_rc: tuple[int, int], geometry: LowResGeometry
    ) -> Tensor:
        """The answer (1, 1, h, w) kept for a lone foreground click on one embedding (1, C, eh, ew), given
        the served model's answer to the click alone ``alone`` (1, 1, h, w)."""
        s = self.inference
        if not s.lone_click_scales_mm:
            return alone
        spacing = (geometry.mm_per_pixel, geometry.mm_per_pixel)
        boxes = boxes_at_scales(click_rc, spacing, geometry.extent, s.lone_click_scales_mm)
        answers = self.bare.decode(embedding, boxes=self.model_boxes(boxes)).low_res_logits
        box_logits, pixel_area = answers[:, 0].cpu().numpy(), geometry.slice_pixels**2
        held = click_rc if s.lone_click_recentre else None
        i = pick_scale([(alone[0, 0].cpu().numpy(), s.lone_click_alone_margin)], box_logits, boxes,
                       s.lone_click_max_contact, pixel_area, held=held)
        chosen, margin = (alone, s.lone_click_alone_margin) if i == 0 else (answers[i - 1 : i], 0.0)
        moved = recentred_boxes(box_logits, boxes, geometry.extent) if s.lone_click_recentre else []
        if moved:  # as SlicePredictor._scaled_click: moved boxes replace the choice, at most so much larger
            more = self.bare.decode(embedding, boxes=self.model_boxes(moved)).low_res_logits
            chosen_np = chosen[0, 0].cpu().numpy()
            j = pick_scale([(chosen_np, margin)], more[:, 0].cpu().numpy(), moved, s.lone_click_max_contact,
                           pixel_area, max_area=s.lone_click_recentre_growth * (chosen_np > 0).sum() * pixel_area,
                           held=held)
            if j > 0:
                return more[j - 1 : j]
        return chosen

    def correction(self, previous: Tensor, new: Tensor, clicks: list[tuple[int, int, int]]) -> Tensor:
        """The logits (1, 1, h, w) kept after a correction: ``new`` where :func:`local_correction` takes the
        new answer, ``previous`` elsewhere (as the predictor feeds them to the next round)."""
        if not self.inference.local_corrections:
            return new
        prev_mask, new_mask = previous[0, 0].cpu().numpy() > 0, new[0, 0].cpu().numpy() > 0
        fg = np.array([(r, c) for r, c, lab in clicks if lab == 1], dtype=np.int64).reshape(-1, 2)
        bg = np.array([(r, c) for r, c, lab in clicks if lab == 0], dtype=np.int64).reshape(-1, 2)
        kept = local_correction(prev_mask, new_mask, fg, bg, self.inference.local_total_share,
                                max_removal=self.inference.local_max_removal)
        differs = torch.as_tensor(kept != new_mask, device=new.device)
        return torch.where(differs, previous.to(new.dtype), new)
