"""Ignored correction clicks repaired by their image-embedding features (lib/core/click_features.py)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from test_clicks import disc

from lib.core.cache import EmbeddingCache
from lib.core.click_features import TokenSimilarity, feature_regions, repair_with_features
from lib.core.config import InferenceSettings, PreprocessSettings
from lib.core.predictor import LoadedModel, SlicePredictor
from lib.core.preprocess import LetterboxFrame
from lib.core.prompts import mask_box


def two_kinds(shape: tuple[int, int], inside: np.ndarray, seed: int = 0) -> TokenSimilarity:
    """A 64 x 64 token embedding of a (rows, cols) slice in a 256 model frame: tokens under ``inside`` point
    one way, the others another, both with a little noise."""
    frame = LetterboxFrame.fit(shape, 256)
    rng = np.random.default_rng(seed)
    tokens = np.zeros((8, 64, 64), np.float32)
    tokens[1] = 1.0
    rows, cols = frame.resized
    kind = torch.nn.functional.interpolate(torch.as_tensor(inside, dtype=torch.float32)[None, None],
                                           size=(rows // 4, cols // 4), mode="nearest")[0, 0].numpy() > 0
    tokens[0, : rows // 4, : cols // 4][kind] = 1.0
    tokens[1, : rows // 4, : cols // 4][kind] = 0.0
    tokens += rng.normal(0, 0.05, tokens.shape).astype(np.float32)
    return TokenSimilarity(torch.as_tensor(tokens)[None], frame, 256, (256, 256))


def test_a_missed_click_takes_the_rest_of_its_region_and_no_more():
    obj = np.zeros((64, 64), bool)
    obj[20:45, 16:49] = True
    answer = obj.copy()
    answer[:, 32:] = False  # the model found the left part
    click = np.array([[32, 40]])  # in the right part it missed
    out = feature_regions(answer, click, np.zeros((0, 2), int), two_kinds(obj.shape, obj))
    added = out & ~answer
    assert out[32, 40] and not (added & ~obj).any()  # only the clicked object's pixels
    assert added.sum() > 5 * disc(obj.shape, 32, 40, 1.5).sum()  # far more than the disc respect_clicks gives
    radius = 0.5 * np.sqrt(answer.sum() / np.pi)  # within half the answer's equivalent radius of the click
    rr, cc = np.nonzero(added)
    assert np.sqrt((rr - 32) ** 2 + (cc - 40) ** 2).max() <= radius + 1e-6


def test_a_held_background_click_cuts_its_leak_and_keeps_the_object():
    obj = np.zeros((64, 64), bool)
    obj[20:45, 16:49] = True
    answer = obj.copy()
    answer[28:37, 49:61] = True  # a leak to the right, of other tissue
    fg, bg = np.array([[32, 30]]), np.array([[32, 56]])
    similarity = two_kinds(obj.shape, obj)
    out = feature_regions(answer, fg, bg, similarity)
    assert out[obj].all()  # the object stays
    leak = answer & ~obj
    assert (leak & ~out).sum() >= 0.8 * leak.sum()  # most of the leak goes
    # a removal over max_removal of the answer is not taken
    assert (feature_regions(answer, fg, bg, similarity, max_removal=0.05) == answer).all()


def test_feature_repairs_always_respect_the_clicks():
    rng = np.random.default_rng(0)
    for i in range(60):
        shape = (int(rng.integers(20, 60)), int(rng.integers(20, 60)))
        similarity = TokenSimilarity(torch.randn(1, 6, 64, 64), LetterboxFrame.fit(shape, 256), 256, (256, 256))
        mask = rng.random(shape) < rng.uniform(0.05, 0.6)
        fg = np.stack([rng.integers(0, shape[0], 4), rng.integers(0, shape[1], 4)], 1)[: rng.integers(1, 5)]
        bg = np.stack([rng.integers(0, shape[0], 4), rng.integers(0, shape[1], 4)], 1)[: rng.integers(0, 5)]
        out = repair_with_features(mask, fg, bg, similarity, radius=1.5)
        both = (fg[:, None, :] == bg[None, :, :]).all(-1).any(1) if len(bg) else np.zeros(len(fg), bool)
        assert out[fg[~both, 0], fg[~both, 1]].all(), i
        if len(bg):
            assert not out[bg[:, 0], bg[:, 1]].any(), i


def test_a_correction_click_the_model_ignores_finds_its_region_on_a_real_slice(lite_model, spleen_slice):
    """The bare model answers a box on the spleen's upper half; a foreground click in the lower half, with
    that answer fed back, is ignored by the model. With feature repair the answer grows into the spleen
    around the click (and only into the spleen); without it, only a small disc is added."""
    image, gt, view, window = spleen_slice
    rows = np.nonzero(gt.any(1))[0]
    middle = (rows[0] + rows[-1]) // 2
    upper = gt.copy()
    upper[middle:] = False
    lower = np.argwhere(gt & ~upper)
    click = lower[np.argmin(np.abs(lower - lower.mean(0)).sum(1))][None]
    added = {}
    for on in (True, False):
        settings = replace(InferenceSettings(), feature_repair=on)
        predictor = SlicePredictor(LoadedModel(lite_model, 0, "base"), EmbeddingCache(64), PreprocessSettings(),
                                   settings)
        first = predictor.predict(image, window, view.spacing, box_rc=mask_box(upper))
        assert not first.mask[click[0, 0], click[0, 1]]
        second = predictor.predict(image, window, view.spacing, click, np.array([1]),
                                   mask_logits=first.low_res_logits)
        assert second.mask[click[0, 0], click[0, 1]]
        added[on] = second.mask & ~first.mask
    assert added[False].sum() <= disc(gt.shape, 0, 0, 3).sum()  # the model ignored the click: a disc
    assert added[True].sum() > 5 * added[False].sum()
    assert (added[True] & gt).sum() >= 0.9 * added[True].sum()
