"""The evaluation suite's metrics, simulated annotator and dataset readers on small arrays with known
answers, plus one run of the protocol through the product's engine."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import SAMPLE
from lib.core.annotator import dice, first_click, interior_point, largest_error_click
from lib.core.config import parse_profile
from lib.core.datasets import load_dataset, merge_structures, npz_volume, png_mask_set, read_label_names
from lib.core.engine import InteractiveSegmenter
from lib.core.eval_backends import InProcessBackend
from lib.core.evaluation import (
    EvalSettings,
    chosen_slices,
    clicks_to_reach,
    evaluate_cases,
    jittered_roi,
    summarize,
    surface_dice,
)
from lib.core.volume import Volume


def square(shape=(32, 32), r0=8, c0=8, size=10) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[r0 : r0 + size, c0 : c0 + size] = True
    return m


def test_dice_known_answers():
    a = square()
    assert dice(a, a) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0
    half = a.copy()
    half[:, 13:] = False  # 5 of 10 columns
    assert dice(half, a) == pytest.approx(2 * 50 / 150)


def test_clicks_to_reach_counts_failures_at_the_cap():
    assert clicks_to_reach([0.5, 0.86, 0.95], 0.85, 20) == (2, True)
    assert clicks_to_reach([0.91], 0.90, 20) == (1, True)
    assert clicks_to_reach([0.1, 0.5, 0.84], 0.85, 3) == (3, False)
    assert clicks_to_reach([0.1] * 25 + [0.99], 0.85, 20) == (20, False)  # beyond the cap does not count


def test_surface_dice_tolerance_and_spacing():
    a = np.zeros((20, 20, 6), bool)
    a[5:15, 5:15, 1:5] = True
    shifted = np.roll(a, 1, axis=0)
    assert surface_dice(a, a, (1, 1, 1), 2.0) == pytest.approx(1.0)
    assert surface_dice(a, shifted, (1, 1, 1), 2.0) == pytest.approx(1.0)  # 1 mm off, 2 mm tolerance
    assert surface_dice(a, shifted, (5, 1, 1), 2.0) < 0.9  # the same shift is 5 mm with 5 mm voxels
    assert surface_dice(a, np.zeros_like(a), (1, 1, 1), 2.0) == 0.0
    assert surface_dice(np.zeros_like(a), np.zeros_like(a), (1, 1, 1), 2.0) == 1.0


def test_first_click_is_the_most_interior_point():
    m = np.zeros((11, 21), bool)
    m[1:10, 3:18] = True  # 9 x 15 rectangle: centre (5, 10)
    assert interior_point(m) == (5, 10)


def test_a_less_exact_first_click_lands_anywhere_in_the_inner_part_of_the_object():
    from scipy import ndimage

    m = np.zeros((40, 60), bool)
    m[5:35, 5:55] = True  # 30 x 50: the deepest pixels are 15 from the border
    depth = ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
    assert first_click(m, 1.0, np.random.default_rng(0)) == interior_point(m) == first_click(m, 0.5)
    clicks = {first_click(m, 0.5, np.random.default_rng(seed)) for seed in range(20)}
    assert len(clicks) > 10 and all(depth[r, c] >= 7.5 for r, c in clicks)
    assert first_click(m, 0.5, np.random.default_rng(3)) == first_click(m, 0.5, np.random.default_rng(3))
    thin = np.zeros((9, 9), bool)
    thin[4, 1:8] = True  # one pixel wide: every pixel is as deep as the deepest
    assert thin[first_click(thin, 0.1, np.random.default_rng(0))]
    with pytest.raises(ValueError, match="first_click_depth"):
        EvalSettings(first_click_depth=0.0)


def test_next_click_goes_to_the_largest_error_with_the_right_sign():
    target = square(size=12)
    missed = target.copy()
    missed[8:20, 14:20] = False  # a 12 x 6 miss inside the object
    r, c, positive = largest_error_click(missed, target)
    assert positive and not missed[r, c] and target[r, c]
    extra = target.copy()
    extra[25:31, 0:30] = True  # a large false-positive band
    r, c, positive = largest_error_click(extra, target)
    assert not positive and extra[r, c] and not target[r, c]
    assert largest_error_click(target, target) is None


def test_jittered_box_contains_the_tight_box_and_is_reproducible():
    m = square((40, 40), 10, 12, 8)
    assert jittered_roi(m, 3, None, 0.1) == [10, 17, 12, 19, 3, 3]
    a = jittered_roi(m, 3, np.random.default_rng(7), 0.5)
    b = jittered_roi(m, 3, np.random.default_rng(7), 0.5)
    assert a == b
    assert a[0] <= 10 and a[1] >= 17 and a[2] <= 12 and a[3] >= 19
    assert a[0] >= 10 - 4 and a[1] <= 17 + 4  # at most half of the 8-pixel extent


def test_chosen_slices_are_spread_and_bounded():
    assert chosen_slices(np.arange(3), 5) == [0, 1, 2]
    picked = chosen_slices(np.arange(10, 30), 5)
    assert len(picked) == 5 and picked[0] == 10 and picked[-1] == 29


def test_npz_volume_geometry(tmp_path):
    imgs = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)  # (z, y, x)
    path = tmp_path / "case.npz"
    np.savez(path, imgs=imgs, gts=(imgs > 10).astype(np.uint8), spacing=np.array([0.5, 0.7, 3.0]),
             direction=np.eye(3).ravel(), origin=np.array([10.0, 20.0, 30.0]))
    case = npz_volume(path)
    assert case.image.shape == (4, 3, 2)  # stored as (x, y, z)
    assert case.image.array[3, 2, 1] == imgs[1, 2, 3]
    # voxel (1, 0, 1) -> LPS (10.5, 20, 33) -> RAS (-10.5, -20, 33)
    ras = case.image.affine @ np.array([1, 0, 1, 1.0])
    assert ras[:3] == pytest.approx([-10.5, -20.0, 33.0])


def test_png_mask_set_both_index_layouts(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    img = (np.arange(20 * 30) % 255).astype(np.uint8).reshape(20, 30)
    Image.fromarray(img).save(tmp_path / "images" / "s1_5.png")
    for name, (r, c) in {"liver": (2, 3), "spleen": (10, 20)}.items():
        m = np.zeros((20, 30), np.uint8)
        m[r : r + 5, c : c + 6] = 255
        Image.fromarray(m).save(tmp_path / "masks" / f"s1_5_{name}_000.png")
    forward = {"demo/images/s1_5.png": ["demo/masks/s1_5_liver_000.png", "demo/masks/s1_5_spleen_000.png"]}
    (tmp_path / "image2label_train.json").write_text(json.dumps(forward))
    (case,) = png_mask_set(tmp_path / "image2label_train.json")
    assert case.case_id == "s1_5" and sorted(case.structures().values()) == ["liver", "spleen"]
    values = {n: v for v, n in case.structures().items()}
    # stored [col, row] like any 2D picture the app reads; the liver mask is rows 2..6, cols 3..8
    assert case.label.array[3:9, 2:7, 0].min() == values["liver"]
    assert case.label.array.sum() == values["liver"] * 30 + values["spleen"] * 30
    backward = {m: "demo/images/s1_5.png" for m in forward["demo/images/s1_5.png"]}
    (tmp_path / "image2label_train.json").unlink()
    (tmp_path / "label2image_test.json").write_text(json.dumps(backward))
    (again,) = load_dataset(tmp_path)
    assert np.array_equal(again.label.array, case.label.array)


def test_label_names_read_in_either_direction(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"1": "liver", "2": "spleen"}))
    (tmp_path / "b.json").write_text(json.dumps({"liver": 1, "spleen": 2}))
    assert read_label_names(tmp_path / "a.json") == read_label_names(tmp_path / "b.json") == {1: "liver", 2: "spleen"}


def test_sample_data_as_dataset_and_merged_structures():
    cases = {c.case_id: c for c in load_dataset(SAMPLE, SAMPLE / "reference")}
    assert set(cases) == {"abdomen_ct", "abdomen_mr", "spine_t2_sct", "spine_t2w_spinegeneric", "spleen_ct"}
    assert "liver" in cases["abdomen_ct"].structures(["liver", "spleen"]).values()
    (merged,) = merge_structures([cases["abdomen_mr"]], "organs")
    assert merged.structures() == {1: "organs"}


class OracleBackend:
    """Answers every prompt with the reference mask: the protocol must then score perfectly."""

    def __init__(self, label: np.ndarray) -> None:
        self.label = label
        self.requests: list[dict] = []

    def segment(self, case, request, three_d):
        self.requests.append(request)
        if three_d:
            return (self.label == 1).astype(np.uint8), {}
        k = request.get("slice", request.get("roi", [0] * 6)[4])
        out = np.zeros_like(self.label)
        out[:, :, k] = self.label[:, :, k] == 1
        return out, {"decoder": 1.0}


def test_protocol_scores_a_perfect_backend_perfectly():
    from lib.core.datasets import LabelledCase

    label = np.zeros((24, 24, 5), np.uint8)
    label[6:16, 8:18, 1:4] = 1
    case = LabelledCase("toy", Volume(np.zeros_like(label, dtype=np.float32), np.eye(4)), Volume(label, np.eye(4)),
                        {1: "box"})
    backend = OracleBackend(label)
    settings = EvalSettings(max_clicks=5, max_slices_per_structure=2)
    slices, volumes = evaluate_cases(backend, [case], settings)
    summary = summarize(slices, volumes, settings)
    assert summary["slices"] == 2 and summary["volumes"] == 1
    assert summary["box_dice"] == summary["click1_dice"] == summary["click5_dice"] == summary["dice_3d"] == 1.0
    assert summary["noc85"] == 1.0 and summary["noc85_failure_rate"] == 0.0
    first = next(r for r in backend.requests if r.get("foreground"))
    assert first["foreground"] == [[10, 12, first["slice"]]] and first["reset_state"]

    # a less exact annotator: the first click moves off the centre, seeded, still inside the object
    def first_clicks() -> list[list[int]]:
        backend = OracleBackend(label)
        evaluate_cases(backend, [case], EvalSettings(max_clicks=2, max_slices_per_structure=2, first_click_depth=0.3))
        return [r["foreground"][0] for r in backend.requests if r.get("foreground") and r["reset_state"]]

    firsts = first_clicks()
    assert len(firsts) == 2 and all(label[r, c, k] == 1 for r, c, k in firsts)
    assert any(f[:2] != [10, 12] for f in firsts) and first_clicks() == firsts


def test_protocol_runs_through_the_engine_with_fed_back_logits():
    profile = parse_profile(
        {"name": "tiny", "backbone": "tiny", "labels": ["spleen"], "inference": {"refine_with_logits": "always"}}
    )
    segmenter = InteractiveSegmenter(profile, adapter_dir=None, device="cpu")
    (case,) = [c for c in load_dataset(SAMPLE, SAMPLE / "reference") if c.case_id == "spleen_ct"]
    settings = EvalSettings(max_clicks=3, max_slices_per_structure=1, three_d=False)
    slices, _ = evaluate_cases(InProcessBackend(segmenter), [case], settings)
    (record,) = slices
    assert len(record.click_dice) == 3 and all(0.0 <= d <= 1.0 for d in record.click_dice)
    assert len(record.latency_ms["decoder"]) == 2 + 3 and len(record.latency_ms["first_encoder"]) == 1
    assert len(segmenter.clients) >= 1  # the click session kept its logits for refinement
