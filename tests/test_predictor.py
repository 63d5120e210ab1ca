"""Predictor quality on real CT, embedding cache behaviour, engine refinement state and hot reload."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import SAMPLE, shared
from lib.core.backbones import build_backbone
from lib.core.cache import EmbeddingCache
from lib.core.checkpoint import AdapterCheckpoint
from lib.core.config import AdapterSettings, InferenceSettings, PreprocessSettings, ProfileError, parse_profile
from lib.core.engine import InteractiveSegmenter, adapter_path, published_versions
from lib.core.model import AdaptedSam
from lib.core.orientation import SliceView
from lib.core.predictor import LoadedModel, SlicePredictor
from lib.core.preprocess import choose_window
from lib.core.prompts import PromptError, VoxelPrompts, mask_box, parse_prompts
from lib.core.volume import load_volume


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


@pytest.fixture(scope="module")
def spleen():
    image = load_volume(shared("ct_spleen_msd", "image.nii.gz"))
    label = load_volume(shared("ct_spleen_msd", "label.nii.gz"))
    return image, label


def test_tight_box_on_every_labelled_spleen_slice_reaches_dice_095(lite_model, spleen):
    image, label = spleen
    pre = PreprocessSettings()
    predictor = SlicePredictor(LoadedModel(lite_model, 0, "base"), EmbeddingCache(64), pre, InferenceSettings())
    view = SliceView.from_affine(image.affine, 2)
    window = choose_window(image.array, pre)
    assert window.source == "ct-soft_tissue"
    scores = []
    for k in range(image.shape[2]):
        gt = view.slice(label.array, k) > 0
        if gt.any():
            result = predictor.predict(view.slice(image.array, k), window, view.spacing, box_rc=mask_box(gt))
            assert result.mask.shape == gt.shape
            scores.append(dice(result.mask, gt))
    assert len(scores) == 20
    assert np.mean(scores) >= 0.95, scores


def test_second_prompt_on_a_slice_reuses_the_embedding(lite_model, spleen):
    image, label = spleen
    cache = EmbeddingCache(64)
    predictor = SlicePredictor(LoadedModel(lite_model, 0, "base"), cache, PreprocessSettings(), InferenceSettings())
    view = SliceView.from_affine(image.affine, 2)
    window = choose_window(image.array, PreprocessSettings())
    k = 12
    gt = view.slice(label.array, k) > 0
    first = predictor.predict(view.slice(image.array, k), window, view.spacing, box_rc=mask_box(gt))
    r, c = np.argwhere(gt)[len(np.argwhere(gt)) // 2]
    second = predictor.predict(
        view.slice(image.array, k),
        window,
        view.spacing,
        np.array([[r, c]]),
        np.array([1]),
        mask_box(gt),
        first.low_res_logits,
    )
    assert not first.embedding_cached and second.embedding_cached
    assert second.timings_ms["encoder"] == 0.0 and cache.hits == 1 and cache.misses == 1
    # the same prompt again gives the same mask from the cached embedding
    again = predictor.predict(view.slice(image.array, k), window, view.spacing, box_rc=mask_box(gt))
    np.testing.assert_array_equal(again.mask, first.mask)


def test_embedding_cache_is_bounded_and_computes_once_under_concurrency():
    cache = EmbeddingCache(max_mb=1.0)  # room for 2 tensors of 400 kB
    calls = []
    gate = threading.Event()

    def compute(i):
        def run():
            calls.append(i)
            gate.wait(2)
            return torch.full((100_000,), float(i))

        return run

    threads = [threading.Thread(target=cache.get_or_compute, args=("enc", "same", compute(i))) for i in range(6)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join()
    assert len(calls) == 1 and cache.misses == 1 and cache.hits == 5
    for key in ("a", "b", "c"):
        cache.get_or_compute("enc", key, compute(0))
    assert len(cache) == 2 and cache.nbytes <= cache.max_bytes
    cache.get_or_compute("other-encoder", "d", compute(1))
    assert cache.retain_only("other-encoder") >= 1 and len(cache) == 1


@pytest.fixture()
def tiny_segmenter(tmp_path):
    profile = parse_profile(
        {"name": "tiny", "backbone": "tiny", "labels": ["spleen"], "inference": {"refine_with_logits": "always"}}
    )
    return InteractiveSegmenter(profile, adapter_dir=tmp_path / "adapters", device="cpu")


def test_refinement_state_is_per_client_and_reset(tiny_segmenter):
    volume = load_volume(SAMPLE / "spleen_ct.nii.gz")
    prompts = parse_prompts({"foreground": [[60, 80, 12]]}, volume.shape)
    seg = tiny_segmenter
    first = seg.segment(volume, prompts, three_d=False, state_key=("alice", "img", "spleen"))
    again = seg.segment(volume, prompts, three_d=False, state_key=("alice", "img", "spleen"))
    other = seg.segment(volume, prompts, three_d=False, state_key=("bob", "img", "spleen"))
    assert not first.params["refined_with_previous_logits"]
    assert again.params["refined_with_previous_logits"]
    assert not other.params["refined_with_previous_logits"]
    seg.clients.reset("alice")
    assert not seg.segment(volume, prompts, three_d=False, state_key=("alice", "img", "spleen")).params[
        "refined_with_previous_logits"
    ]
    # 2D: only the prompted slice is filled
    assert set(np.nonzero(first.label)[2]) <= {12}
    # the intensity window was computed once for the volume, not once per request
    assert list(volume.derived) == [("window", seg.profile.preprocessing, None)]


def test_empty_or_background_only_prompts_are_refused(tiny_segmenter):
    volume = load_volume(SAMPLE / "spleen_ct.nii.gz")
    with pytest.raises(PromptError, match="no prompt"):
        tiny_segmenter.segment(volume, parse_prompts({}, volume.shape), three_d=False)
    with pytest.raises(PromptError, match="foreground"):
        tiny_segmenter.segment(volume, parse_prompts({"background": [[1, 1, 1]]}, volume.shape), three_d=False)


def test_auto_mode_refuses_until_a_head_is_trained(tiny_segmenter):
    volume = load_volume(SAMPLE / "spleen_ct.nii.gz")
    with pytest.raises(PromptError, match="not been trained"):
        tiny_segmenter.segment_auto(volume)


def test_published_adapters_are_hot_reloaded_and_old_embeddings_dropped(tiny_segmenter):
    seg = tiny_segmenter
    volume = load_volume(SAMPLE / "spleen_ct.nii.gz")
    prompts = VoxelPrompts(np.array([[60, 80, 12]]), np.zeros((0, 3), np.int64), None)
    base = seg.segment(volume, prompts, three_d=False)
    assert base.params["model_version"] == "base" and len(seg.embeddings) == 1
    # a partial (temporary) file is never picked up
    seg.adapter_dir.mkdir(parents=True)
    (seg.adapter_dir / ".adapter_v0001.pt.x.tmp").write_bytes(b"partial")
    assert published_versions(seg.adapter_dir) == []
    trained = AdaptedSam(build_backbone("tiny"), AdapterSettings(), labels=("spleen",))
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if p.requires_grad and ".adapter.up." in name:
                p.normal_(0, 0.05)
    AdapterCheckpoint.from_model(trained, version=1).save(adapter_path(seg.adapter_dir, 1))
    after = seg.segment(volume, prompts, three_d=False)
    assert after.params["model_version"] == "v1"
    assert not after.params["embedding_cached"], "embedding of the old encoder adapters was reused"
    assert len(seg.embeddings) == 1
    assert not np.array_equal(after.label, base.label) or after.params["predicted_iou"] != base.params["predicted_iou"]
    # an unusable newer file (not written by the trainer) never replaces the last good version
    (seg.adapter_dir / "adapter_v0002.pt").write_bytes(b"copied by hand, truncated")
    assert seg.segment(volume, prompts, three_d=False).params["model_version"] == "v1"
    # rollback by configuration
    seg.pinned_version = 99
    assert seg.segment(volume, prompts, three_d=False).params["model_version"] == "base"


def test_a_lone_click_gets_three_masks_only_from_adapters_trained_for_it(tiny_segmenter):
    volume = load_volume(SAMPLE / "spleen_ct.nii.gz")
    loaded = tiny_segmenter.current()
    own = tiny_segmenter.predictor(loaded)  # the lone click's own answer: no scale candidates, and the logits
    # as the decoder gives them (not made to give the shown answer for the next round)
    predictor = SlicePredictor(loaded, own.cache, own.preprocessing,
                               replace(own.inference, lone_click_scales_mm=(), repair_logit=0.0))
    view = SliceView.from_affine(volume.affine, 2)
    window = tiny_segmenter.window(volume)
    image = view.slice(volume.array, 12)
    click = dict(points_rc=np.array([[60, 80]]), point_labels=np.array([1]))
    embedding, frame, _, _ = predictor.embed(image, window, view.spacing)
    xy = torch.as_tensor(frame.points_to_model(click["points_rc"]), dtype=torch.float32)[None]
    with torch.inference_mode():
        three = loaded.model.decode(embedding, points=(xy, torch.ones(1, 1, dtype=torch.int64)), multimask=True)
        # one mask: the served version's decoder runtime (OpenVINO where installed), as the predictor uses it
        single = loaded.decoder()(embedding, points=(xy, torch.ones(1, 1, dtype=torch.int64)))
    best = int(three.iou[0].argmax())
    assert not loaded.model.trained_multimask_single_click  # "auto": the bare model keeps its one mask
    assert torch.equal(predictor.predict(image, window, view.spacing, **click).low_res_logits, single.low_res_logits)
    loaded.model.trained_multimask_single_click = True
    result = predictor.predict(image, window, view.spacing, **click)
    assert torch.equal(result.low_res_logits, three.low_res_logits[:, best : best + 1])
    assert result.iou == pytest.approx(float(three.iou[0, best]))
    # a second click (or a box, or fed-back logits) always gets the one mask
    two = predictor.predict(image, window, view.spacing, np.array([[60, 80], [70, 90]]), np.array([1, 0]))
    assert two.low_res_logits.shape == single.low_res_logits.shape


def test_inference_modes_are_validated():
    with pytest.raises(ProfileError, match="multimask_for_single_click must be auto, always or never"):
        parse_profile({"name": "t", "backbone": "tiny", "inference": {"multimask_for_single_click": "yes"}})
