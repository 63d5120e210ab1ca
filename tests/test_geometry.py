"""Coordinate conventions: voxel indices <-> display slice <-> model frame, ROI order, file geometry."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from conftest import SAMPLE
from lib.core.orientation import SliceView
from lib.core.preprocess import LetterboxFrame
from lib.core.prompts import PromptError, mask_box, parse_points, parse_roi
from lib.core.volume import VolumeError, load_volume, write_label


def _reoriented(array: np.ndarray, affine: np.ndarray, codes: str) -> tuple[np.ndarray, np.ndarray]:
    img = nib.Nifti1Image(array, affine)
    target = nib.orientations.axcodes2ornt(tuple(codes))
    current = nib.orientations.io_orientation(affine)
    out = img.as_reoriented(nib.orientations.ornt_transform(current, target))
    return np.asarray(out.dataobj), out.affine


@pytest.mark.parametrize("codes", ["RAS", "LPS", "LAS", "PSR", "SPL", "IRA"])
def test_same_anatomy_same_display_whatever_the_storage_order(codes):
    rng = np.random.default_rng(0)
    array = rng.random((7, 9, 5)).astype(np.float32)
    affine = np.diag([0.8, 0.9, 3.0, 1.0])
    ref_view = SliceView.from_affine(affine, 2)  # axial slices of the RAS volume
    other, other_affine = _reoriented(array, affine, codes)
    # the array axis that now runs along S-I holds the axial slices
    axis = int(np.argmax(np.abs(other_affine[2, :3])))
    view = SliceView.from_affine(other_affine, axis)
    for k_ras in range(array.shape[2]):
        k = k_ras if other_affine[2, axis] > 0 else array.shape[2] - 1 - k_ras
        np.testing.assert_array_equal(view.slice(other, k), ref_view.slice(array, k_ras))
    assert view.spacing == pytest.approx(ref_view.spacing)


def test_axial_display_is_radiological():
    # RAS storage: i -> patient right, j -> anterior. Display: anterior up, patient right on screen left.
    view = SliceView.from_affine(np.eye(4), 2)
    shape = (4, 6, 1)
    rc = view.voxel_to_display(np.array([[3, 5, 0], [0, 0, 0]]), shape)
    # most right + most anterior voxel: top row, left column
    assert rc[0].tolist() == [0, 0]
    # most left + most posterior voxel: bottom row, right column
    assert rc[1].tolist() == [5, 3]


@pytest.mark.parametrize("codes", ["RAS", "LPS", "PSR"])
def test_voxel_to_display_matches_slice_indexing(codes):
    rng = np.random.default_rng(1)
    array, affine = _reoriented(rng.random((6, 8, 5)).astype(np.float32), np.eye(4), codes)
    view = SliceView.from_affine(affine, 2)
    for ijk in [(0, 0, 0), (5, 3, 2), (2, 7, 4)]:
        ijk = tuple(min(v, s - 1) for v, s in zip(ijk, array.shape, strict=True))
        ((r, c),) = view.voxel_to_display(np.array([ijk]), array.shape)
        assert view.slice(array, ijk[2])[r, c] == array[ijk]
        # and back
        back = np.zeros(array.shape[:2])
        disp = np.zeros(view.in_plane_shape(array.shape))
        disp[r, c] = 1
        back = view.from_display(disp)
        assert back[ijk[0], ijk[1]] == 1 and back.sum() == 1


def test_letterbox_points_map_exactly_both_ways():
    frame = LetterboxFrame.fit((512, 300), 256)
    assert frame.resized == (256, 150)
    rc = np.array([[0, 0], [511, 299], [100.0, 37.0]])
    np.testing.assert_allclose(frame.points_from_model(frame.points_to_model(rc)), rc, atol=1e-9)
    # centre of the first pixel: model pixel centre at 0.5 * scale - 0.5
    np.testing.assert_allclose(frame.points_to_model(np.array([[0, 0]])), [[0.5 * 0.5 - 0.5] * 2])


def test_letterbox_uses_physical_aspect():
    # a sagittal slice of 5 mm CT: 26 rows of 5 mm, 166 columns of 0.79 mm
    frame = LetterboxFrame.fit((26, 166), 256, spacing=(5.0, 0.79))
    h, w = frame.resized
    assert w == 256 and h == round(26 * 5.0 / (166 * 0.79) * 256)


def test_box_to_model_keeps_order_and_corners():
    frame = LetterboxFrame.fit((100, 200), 256)
    x0, y0, x1, y1 = frame.box_to_model(10, 20, 50, 150)
    assert x0 < x1 and y0 < y1
    np.testing.assert_allclose([x0, y0], frame.points_to_model(np.array([[10, 20]]))[0])


def test_roi_min_max_may_be_swapped_and_is_clipped():
    shape = (50, 60, 10)
    a = parse_roi([40, 10, 5, 30, 8, 2], shape)
    b = parse_roi([10, 40, 30, 5, 2, 8], shape)
    assert a == b and a.lo == (10, 5, 2) and a.hi == (40, 30, 8)
    c = parse_roi([-5, 70, 10, 20, 0, 9], shape)
    assert c.lo == (0, 10, 0) and c.hi == (49, 20, 9)


@pytest.mark.parametrize(
    "roi",
    [[10, 10, 5, 30, 0, 1], [0, 5, 3, 3, 0, 0], [60, 70, 0, 5, 0, 1], [1, 2, 3], "box", [1, 2, 3, 4, 5, float("nan")]],
)
def test_bad_rois_are_rejected_with_a_reason(roi):
    with pytest.raises(PromptError):
        parse_roi(roi, (50, 60, 10))


@pytest.mark.parametrize(
    "points", [[[1, 2]], [[1, 2, 99]], [[-1, 0, 0]], [["a", 0, 0]], [[1.5, 0, 0]], "x", [[True, 0, 0]]]
)
def test_bad_points_are_rejected_with_a_reason(points):
    with pytest.raises(PromptError):
        parse_points(points, "foreground", (10, 10, 10))


def test_mask_box_is_inclusive_and_clipped():
    m = np.zeros((10, 12), bool)
    m[2:5, 3:9] = True
    assert mask_box(m) == (2, 3, 4, 8)
    assert mask_box(m, margin=4) == (0, 0, 8, 11)
    assert mask_box(np.zeros((3, 3), bool)) is None


def test_mask_box_margins_per_axis_round_outward():
    mask = np.zeros((20, 30), dtype=bool)
    mask[5:9, 10:21] = True
    assert mask_box(mask, (1.5, 12.0)) == (3, 0, 10, 29)
    assert mask_box(mask, 0.5) == (4, 9, 9, 21)


@pytest.mark.parametrize("name", ["spleen_ct.nii.gz", "abdomen_mr.nii.gz", "spine_t2_sct.nii.gz"])
@pytest.mark.parametrize("ext", [".nrrd", ".nii.gz"])
def test_written_label_has_the_image_geometry(tmp_path, name, ext):
    image = load_volume(SAMPLE / name)
    label = (image.array > np.median(image.array)).astype(np.uint8)
    out = load_volume(write_label(label, image.affine, tmp_path / f"label{ext}"))
    assert out.shape == image.shape
    np.testing.assert_allclose(out.affine, image.affine, atol=1e-5)
    np.testing.assert_array_equal(out.array, label)


def test_four_dimensional_images_are_refused(tmp_path):
    path = tmp_path / "4d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), np.eye(4)), path)
    with pytest.raises(VolumeError, match="3D"):
        load_volume(path)


def test_png_slices_load_as_one_slice_volumes_shown_as_the_picture():
    from PIL import Image

    from conftest import shared

    path = shared("ct2d_amos_totalseg", "images", "amos_0004_75.png")
    picture = np.asarray(Image.open(path).convert("L"))
    volume = load_volume(path)
    assert volume.shape == (picture.shape[1], picture.shape[0], 1)
    view = SliceView.from_affine(volume.affine, 2)
    np.testing.assert_array_equal(view.slice(volume.array, 0), picture)
    # a click at picture row r, column c is voxel [c, r, 0]
    assert view.voxel_to_display(np.array([[7, 3, 0]]), volume.shape).tolist() == [[3, 7]]


def test_a_label_on_part_of_the_grid_is_placed_by_physical_position():
    from lib.core.volume import Volume, label_in_grid

    affine = np.array([[-0.8, 0, 0, 10.0], [0, 0.8, 0, -20.0], [0, 0, 5.0, 30.0], [0, 0, 0, 1]])
    grid = Volume(np.zeros((6, 5, 8), np.int16), affine)
    part = np.zeros((6, 5, 3), np.uint8)
    part[2, 3, 1] = 7
    shifted = affine.copy()
    shifted[:3, 3] += affine[:3, 2] * 4  # the label's first slice is slice 4 of the grid
    placed = label_in_grid(Volume(part, shifted), grid).array
    assert placed.shape == grid.shape and placed[2, 3, 5] == 7 and placed.sum() == 7


def test_a_shipped_dicom_seg_reads_with_its_segment_names():
    from lib.core.dicom_seg import read_seg

    label, names = read_seg(SAMPLE / "dicom" / "ct_dcmqi_seg" / "liver.dcm")
    assert names == {1: "liver"}
    assert label.array.max() == 1 and label.array.any()
    with pytest.raises(VolumeError, match="not a DICOM-SEG"):
        read_seg(next((SAMPLE / "dicom" / "ct_dcmqi_3slice").glob("*.dcm")))
