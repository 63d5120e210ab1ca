"""Training views for heads on a frozen encoder (lib/core/augment.py) and the DICOM series reader the
head's training data goes through: labels stay on their anatomy, CT stays CT."""

from __future__ import annotations

import numpy as np

from conftest import DICOM, series_geometry
from lib.core.augment import hu_jittered, training_views, zoomed
from lib.core.datasets import LabelledCase, dicom_series_with_seg
from lib.core.volume import Volume


def ct_case() -> LabelledCase:
    rng = np.random.default_rng(1)
    image = rng.normal(40, 20, (60, 50, 3)).astype(np.float32)
    image[:5] = -1000  # air
    label = np.zeros(image.shape, np.uint8)
    label[20:35, 10:30, 1] = 1
    label[40:45, 30:40, 2] = 2
    affine = np.diag([0.8, 0.8, 3.0, 1.0])
    affine[:3, 3] = [-10, 5, 100]
    return LabelledCase("ct", Volume(image, affine), Volume(label, affine), {1: "liver", 2: "spleen"}, "test")


def world_of_labels(case: LabelledCase, value: int) -> set[tuple[float, ...]]:
    ijk = np.argwhere(case.label.array == value)
    xyz = ijk @ case.label.affine[:3, :3].T + case.label.affine[:3, 3]
    return {tuple(np.round(p, 3)) for p in xyz}


def test_zoomed_views_keep_every_label_on_its_place_in_the_world():
    case = ct_case()
    rng = np.random.default_rng(0)
    for factor in (0.6, 0.8, 1.2, 1.5):
        view = zoomed(case, factor, rng)
        assert view.image.shape == view.label.shape
        np.testing.assert_allclose(view.image.affine, view.label.affine)
        expected = round(60 / factor), round(50 / factor)
        assert view.image.shape[:2] == expected and view.image.shape[2] == 3
        # every labelled voxel of the view is one of the original's, at the same world position
        for value in (1, 2):
            assert world_of_labels(view, value) <= world_of_labels(case, value)
        # image values too: a voxel of the view sits where the same value sat in the original
        i, j, k = (s // 2 for s in view.image.shape)
        xyz = view.image.affine[:3, :3] @ [i, j, k] + view.image.affine[:3, 3]
        src = np.rint(np.linalg.inv(case.image.affine[:3, :3]) @ (xyz - case.image.affine[:3, 3])).astype(int)
        if np.all((src >= 0) & (src < case.image.shape)):
            assert view.image.array[i, j, k] == case.image.array[tuple(src)]
        else:
            assert view.image.array[i, j, k] == case.image.array.min()  # padding
    # a wider field of view keeps all of the labels; a crop keeps the labelled centre
    wide = zoomed(case, 0.6, rng)
    assert (wide.label.array > 0).sum() == (case.label.array > 0).sum()
    assert (zoomed(case, 1.5, rng).label.array == 1).any()


def test_ct_values_move_but_air_stays_air_and_other_images_are_untouched():
    case = ct_case()
    moved = hu_jittered(case, 30.0, 1.1)
    air = case.image.array < -500
    np.testing.assert_array_equal(moved.image.array[air], case.image.array[air])
    np.testing.assert_allclose(moved.image.array[~air], (case.image.array[~air] - 40) * 1.1 + 70, rtol=1e-5)
    np.testing.assert_array_equal(moved.label.array, case.label.array)
    mr = LabelledCase("mr", Volume(np.abs(case.image.array), case.image.affine), case.label, case.names)
    assert hu_jittered(mr, 30.0, 1.1) is mr
    views = training_views(case, 3, np.random.default_rng(0))
    assert len(views) == 3 and len({v.case_id for v in views}) == 3


def test_a_dicom_series_and_its_seg_read_into_one_grid():
    case = dicom_series_with_seg(DICOM / "ct_dcmqi_3slice", DICOM / "ct_dcmqi_seg" / "liver.dcm", "dicom")
    shape, affine = series_geometry(DICOM / "ct_dcmqi_3slice")
    assert case.image.shape == shape == case.label.shape
    np.testing.assert_allclose(case.image.affine, affine, atol=1e-3)
    assert set(case.names.values()) == {"liver"}
    assert case.image.array.min() < -500  # Hounsfield units
    assert (case.label.array > 0).sum() > 1000
