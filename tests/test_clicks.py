"""What a click means: the guarantee that clicks are respected, and lone clicks tried at several scales."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from conftest import APP, SAMPLE, shared
from lib.core.cache import EmbeddingCache
from lib.core.clicks import (
    boxes_at_scales,
    correction_query,
    deep_negative,
    local_correction,
    pick_scale,
    recentred_boxes,
    respect_clicks,
    side_contact,
    stability,
    undecided_near_wrong_clicks,
)
from lib.core.config import InferenceSettings, PreprocessSettings
from lib.core.predictor import LoadedModel, SlicePredictor
from lib.core.volume import load_volume


def disc(shape: tuple[int, int], r: int, c: int, radius: float) -> np.ndarray:
    rr, cc = np.ogrid[: shape[0], : shape[1]]
    return (rr - r) ** 2 + (cc - c) ** 2 <= radius**2


def test_a_missed_foreground_click_is_added_locally():
    mask = disc((64, 64), 20, 20, 8)
    out = respect_clicks(mask, np.array([[50, 50]]), np.empty((0, 2)), radius=2)
    assert out[50, 50] and out[mask].all()
    assert (out & ~mask).sum() <= 13  # a disc of radius 2, nothing else


def test_a_background_click_on_a_separate_blob_removes_that_blob_only():
    organ, blob = disc((64, 64), 20, 20, 8), disc((64, 64), 50, 50, 5)
    out = respect_clicks(organ | blob, np.array([[20, 20]]), np.array([[50, 50]]))
    assert not out[blob].any()
    assert out[organ].all()


def test_a_background_click_on_a_leak_cuts_there_and_keeps_the_object():
    organ = disc((64, 64), 30, 20, 10)
    leak = np.zeros((64, 64), bool)
    leak[27:34, 30:50] = True
    out = respect_clicks(organ | leak, np.array([[30, 20]]), np.array([[30, 44]]))
    assert not out[30, 44]
    assert out[organ & (disc((64, 64), 30, 20, 8))].all()  # the object's core is untouched
    assert out.sum() < (organ | leak).sum()


def test_objects_with_several_parts_keep_every_part():
    left, right = disc((64, 64), 32, 12, 6), disc((64, 64), 32, 50, 6)
    out = respect_clicks(left | right, np.array([[32, 12], [32, 50]]), np.array([[5, 5]]))
    assert np.array_equal(out, left | right)
    # a part without its own click is kept too: only a background click removes anything
    out = respect_clicks(left | right, np.array([[32, 12]]), np.empty((0, 2)))
    assert np.array_equal(out, left | right)


def test_a_pixel_clicked_both_ways_stays_background():
    mask = disc((32, 32), 16, 16, 6)
    out = respect_clicks(mask, np.array([[16, 16]]), np.array([[16, 16]]))
    assert not out[16, 16]


def test_random_clicks_are_always_respected():
    rng = np.random.default_rng(0)
    for _ in range(200):
        mask = rng.random((40, 40)) < rng.uniform(0.05, 0.6)
        fg = rng.integers(0, 40, size=(rng.integers(1, 6), 2))
        bg = rng.integers(0, 40, size=(rng.integers(0, 6), 2))
        out = respect_clicks(mask, fg, bg)
        both = (fg[:, None, :] == bg[None, :, :]).all(-1).any(1) if len(bg) else np.zeros(len(fg), bool)
        assert out[fg[~both, 0], fg[~both, 1]].all()
        if len(bg):
            assert not out[bg[:, 0], bg[:, 1]].any()


def test_side_contact_ignores_sides_on_the_slice_border():
    mask = np.zeros((20, 20), bool)
    mask[5:15, 0:10] = True
    assert side_contact(mask, (5, 0, 14, 9)) > 0  # runs along the box's top, bottom and right sides
    assert side_contact(mask, (2, 0, 17, 12)) == 0  # the mask is inside the box; the left side is the border


def test_a_correction_click_changes_only_the_region_it_was_about():
    previous = np.zeros((40, 40), bool)
    previous[10:20, 10:20] = True
    previous[14:16, 20:30] = True  # a leak to the right
    new = previous.copy()
    new[14:16, 20:30] = False  # the model removed the leak ...
    new[10:20, 10] = False  # ... and also moved the far edge
    new[30:34, 30:34] = True  # ... and added a blob elsewhere
    out = local_correction(previous, new, np.array([[12, 12]]), np.array([[15, 27]]))
    assert not out[14:16, 20:30].any()  # the leak under the background click is gone
    assert out[10:20, 10].all() and not out[30:34, 30:34].any()  # the rest is the previous answer
    # unless the other changes are small next to the answer (26 pixels of 120): a refinement, kept
    assert (local_correction(previous, new, np.array([[12, 12]]), np.array([[15, 27]]), total_share=0.25) == new).all()


def test_a_missed_part_is_added_and_nothing_else():
    previous = np.zeros((40, 40), bool)
    previous[5:15, 5:15] = True
    new = previous.copy()
    new[5:15, 15:25] = True  # the part the foreground click asked for
    new[30:35, 30:35] = True  # unrelated
    out = local_correction(previous, new, np.array([[8, 8], [10, 20]]), np.zeros((0, 2), int))
    assert out[5:15, 5:25].all() and not out[30:35, 30:35].any()
    # clicks the previous answer already got right: the new answer as it is
    assert (local_correction(previous, new, np.array([[8, 8]]), np.zeros((0, 2), int)) == new).all()


def test_a_correction_asks_about_the_part_its_wrong_clicks_are_on():
    """Clicks belong to the previous answer's nearest part: a correction on one part of several asks only
    that part's clicks and leaves the other parts out; a foreground click far from every part is a new part."""
    left, right = disc((64, 64), 20, 12, 5), disc((64, 64), 20, 50, 5)
    fg = np.array([[20, 12], [20, 50], [20, 57]])  # one inside each part, one just outside the right one
    bg = np.array([[40, 12], [20, 53]])  # one near the left part, one inside the right part
    query = correction_query(left | right, fg, bg, gap=1.0, by_part=True)
    assert query.foreground.tolist() == [False, True, True] and query.background.tolist() == [False, True]
    assert not query.apart.any() and np.array_equal(query.other_parts, left)
    # one part, or wrong clicks on two parts: everything is asked, as the model was trained
    assert correction_query(left, fg[:1], bg, 1.0, True).other_parts is None
    both = correction_query(left | right, np.array([[20, 19], [20, 57]]), bg[:1], 1.0, True)
    assert both.other_parts is None and both.foreground.all() and both.background.all()
    assert correction_query(left | right, fg, bg, 1.0, by_part=False).other_parts is None
    # a foreground click farther from its nearest part than the part's equivalent radius (5): a new part
    far = correction_query(left | right, np.array([[20, 12], [50, 30]]), np.zeros((0, 2), int), 1.0, True)
    assert far.apart.tolist() == [False, True] and far.foreground.tolist() == [True, False]
    assert not correction_query(left | right, np.array([[50, 30]]), np.zeros((0, 2), int), 0.0, True).apart.any()
    assert far.largest_part == left.sum()  # the parts are equal discs
    # nothing left of the previous answer: a foreground click starts a part of its own
    empty = correction_query(np.zeros((64, 64), bool), fg[:1], bg, 1.0, True)
    assert empty.apart.all() and not empty.foreground.any()


def test_a_correction_that_adds_a_part_elsewhere_keeps_the_previous_answer():
    """With clicks handled elsewhere (a new part), the model's answer is never taken whole: without a
    click it changes, the previous answer stays."""
    previous = disc((40, 40), 10, 10, 5)
    bridged = previous | disc((40, 40), 20, 20, 12)  # the model bridged the far click to the object
    out = local_correction(previous, bridged, np.array([[10, 10]]), np.zeros((0, 2), int), whole_new=False)
    assert np.array_equal(out, previous)
    assert np.array_equal(local_correction(previous, bridged, np.array([[10, 10]]), np.zeros((0, 2), int)), bridged)


def test_a_click_on_the_second_part_of_an_object_finds_that_part():
    """Both kidneys as one object (abdomen CT of sample-data), the shipped model with part-wise corrections
    (``part_corrections``, ``new_part_gap = 1``; the profile's default since round 23): a click in the
    right kidney, then one in the left. The second click is answered as the left kidney's own lone click and added; the
    first answer stays. With the options off (both clicks asked together) the model took under half of
    the left kidney: 97 of its 197 pixels on slice 0."""
    from lib.core.annotator import interior_point
    from lib.core.config import load_profile
    from lib.core.engine import InteractiveSegmenter
    from lib.core.prompts import parse_prompts

    image = load_volume(SAMPLE / "abdomen_ct.nii.gz")
    label = load_volume(SAMPLE / "reference" / "abdomen_ct.nii.gz").array
    segmenter = InteractiveSegmenter(load_profile(APP / "configs" / "lite_medsam.toml"), device="cpu",
                                     embeddings=EmbeddingCache(256))
    for k in (0, 3):
        right, left = label[:, :, k] == 2, label[:, :, k] == 3
        first, second = [*interior_point(right), k], [*interior_point(left), k]
        key = ("annotator", "abdomen_ct", f"kidneys-{k}")
        one = segmenter.segment(image, parse_prompts({"foreground": [first]}, image.shape), three_d=False,
                                state_key=key).label[:, :, k] > 0
        two = segmenter.segment(image, parse_prompts({"foreground": [first, second]}, image.shape),
                                three_d=False, state_key=key).label[:, :, k] > 0
        assert two[one].all()
        assert (two & ~one & left).sum() >= 0.6 * left.sum(), k


def test_a_new_part_far_larger_than_the_answers_pieces_is_not_added():
    """The colon of the sample abdomen MR, slice 0 (124 pixels in five pieces of 18-40), with part-wise
    corrections (the profile's default): the ninth click, outside the answer and apart from its pieces
    (the largest 61 pixels), was answered alone as 1118 pixels of bowel and fat and added, and later
    negative clicks could not take it out (Dice 0.56 -> 0.16). A new part's scale is chosen among answers no larger than
    ``new_part_max_ratio`` (1.5) x the answer's largest piece."""
    from lib.core.config import load_profile
    from lib.core.engine import InteractiveSegmenter
    from lib.core.prompts import parse_prompts

    image = load_volume(SAMPLE / "abdomen_mr.nii.gz")
    colon = load_volume(SAMPLE / "reference" / "abdomen_mr.nii.gz").array[:, :, 0] == 15
    # the simulated annotator's clicks of that session (voxel i, j on slice 0), True: foreground
    clicks = [(81, 28, True), (82, 35, False), (28, 24, True), (32, 24, False), (25, 22, False), (86, 37, False),
              (37, 18, True), (41, 17, False), (32, 37, True)]
    segmenter = InteractiveSegmenter(load_profile(APP / "configs" / "lite_medsam.toml"), device="cpu",
                                     embeddings=EmbeddingCache(256))
    for n in range(1, len(clicks) + 1):
        request = {"foreground": [[i, j, 0] for i, j, fg in clicks[:n] if fg],
                   "background": [[i, j, 0] for i, j, fg in clicks[:n] if not fg]}
        answer = segmenter.segment(image, parse_prompts(request, image.shape), three_d=False,
                                   state_key=("annotator", "abdomen_mr", "colon")).label[:, :, 0] > 0
    assert answer.sum() < 3 * colon.sum(), answer.sum()


def test_the_prompt_is_undecided_only_near_the_clicks_the_previous_answer_got_wrong():
    """A correction's mask prompt is released (0) in a disc of ``release`` x the answer's equivalent radius
    around each wrong click, nowhere near the clicks the answer already has right, and nowhere when off."""
    previous = disc((80, 80), 40, 30, 10)  # equivalent radius about 10
    clicks = np.array([[40, 30], [40, 55], [40, 36], [10, 10]])  # fg right, fg missed, bg inside, bg right
    labels = np.array([1, 1, 0, 0])
    near = undecided_near_wrong_clicks(previous, clicks, labels, 0.5)
    radius = 0.5 * np.sqrt(previous.sum() / np.pi)
    assert near[40, 55] and near[40, 36] and not near[40, 30] and not near[10, 10]
    assert near.sum() <= 2 * np.pi * (radius + 1) ** 2
    assert near[40, int(55 + radius) - 1] and not near[40, int(55 + radius) + 1]
    assert not undecided_near_wrong_clicks(previous, clicks, labels, 0.0).any()
    assert not undecided_near_wrong_clicks(previous, clicks[[0, 3]], labels[[0, 3]], 0.5).any()


def test_undecided_prompts_near_wrong_clicks_make_hippocampus_sessions_better():
    """Simulated annotator sessions (5 clicks, 3 slices per structure) on four hippocampus MR cases the click
    adapter never trained on (its checkpoint-selection cases): with the profile's
    ``correction_prompt_release`` (0.5) the mean Dice after 5 clicks is above the same sessions with the
    previous logits fed back everywhere (measured 0.797 -> 0.808)."""
    from lib.core.config import load_profile
    from lib.core.datasets import volume_pair
    from lib.core.engine import InteractiveSegmenter
    from lib.core.eval_backends import InProcessBackend
    from lib.core.evaluation import EvalSettings, dice_curve, evaluate_cases

    root = shared("mr_hippocampus_msd")
    cases = [volume_pair(root / name / "image.nii.gz", root / name / "label.nii.gz", {}, name, "hippocampus")
             for name in ("train_hippocampus_084", "train_hippocampus_286", "train_hippocampus_219",
                          "train_hippocampus_217")]
    profile = load_profile(APP / "configs" / "lite_medsam.toml")
    assert profile.inference.correction_prompt_release == 0.5
    settings = EvalSettings(max_clicks=5, max_slices_per_structure=3, three_d=False, seed=0)
    cache = EmbeddingCache(256)
    after = {}
    for release in (0.0, 0.5):
        segmenter = InteractiveSegmenter(
            replace(profile, inference=replace(profile.inference, correction_prompt_release=release)),
            device="cpu", embeddings=cache)
        records, _ = evaluate_cases(InProcessBackend(segmenter), cases, settings)
        after[release] = dice_curve(records)[-1]
    assert after[0.5] > after[0.0] + 0.003, after


def test_a_foreground_click_only_adds_and_a_background_click_only_removes():
    """The fetal-head case: after a 0.96 answer, a foreground click on a missed strip made the adapter
    grow the strip and shrink the far side, in one connected changed region (Dice 0.96 -> 0.85)."""
    previous = np.zeros((40, 40), bool)
    previous[10:30, 10:30] = True
    new = previous.copy()
    new[10:30, 30:34] = True  # the missed strip, asked for by the click ...
    new[26:30, 20:30] = False  # ... and a removal touching it, which no click asked for
    out = local_correction(previous, new, np.array([[20, 32]]), np.zeros((0, 2), int))
    assert out[10:30, 10:34].all()  # the strip is added and nothing removed
    # the mirror case: a background click on a leak takes the removal, not an addition touching it
    leak = previous.copy()
    leak[18:22, 30:36] = True
    new = leak.copy()
    new[18:22, 30:36] = False
    new[22:26, 30:33] = True
    out = local_correction(leak, new, np.array([[15, 15]]), np.array([[20, 34]]))
    assert not out[18:22, 30:36].any() and not out[22:26, 30:33].any() and out[10:30, 10:30].all()


def test_a_correction_never_undoes_what_earlier_clicks_settled():
    """The spleen case: after a good answer, a negative click on a small leak made the adapter answer a
    fragment; the removed region touched the click, and the whole organ went (Dice 0.97 -> 0.21)."""
    previous = np.zeros((60, 60), bool)
    previous[10:40, 10:40] = True  # the organ
    previous[24:27, 40:50] = True  # a leak to the right
    fragment = np.zeros_like(previous)
    fragment[12:18, 12:18] = True  # the model's answer to the negative click: a fragment around the first click
    fg, bg = np.array([[15, 15]]), np.array([[25, 46]])
    out = respect_clicks(local_correction(previous, fragment, fg, bg, total_share=0.25), fg, bg)
    assert out[10:40, 10:40].all()  # the organ stays (the removal held more than half the answer) ...
    assert not out[25, 46] and out[25, 41]  # ... and the leak is cut around the click
    # a changed region that would take out a foreground click the previous answer had: kept as it was
    moved = previous.copy()
    moved[10:40, 30:40] = False
    fg2 = np.array([[15, 15], [35, 35]])
    out = local_correction(previous, moved, fg2, bg, total_share=0.25)
    assert out[10:40, 30:40].all()


def test_a_negative_click_never_takes_a_large_part_of_the_object():
    """The abdomen CT case: after a 0.90 answer with a leak, the adapter answered a negative click on the
    leak by removing the leak and 44 % of the answer in one region (Dice 0.90 -> 0.73). A removal of more
    than a quarter of the answer is not taken; the leak is cut around the click instead."""
    previous = np.zeros((60, 60), bool)
    previous[10:40, 10:40] = True  # the organ
    previous[24:27, 40:50] = True  # a leak to the right
    answer = previous.copy()
    answer[10:40, 28:50] = False  # the leak and the organ's right 40 %, one removed region
    fg, bg = np.array([[25, 15]]), np.array([[25, 46]])
    out = respect_clicks(local_correction(previous, answer, fg, bg), fg, bg)
    assert out[10:40, 10:40].all() and not out[25, 46]
    small = previous.copy()
    small[22:29, 40:50] = False  # removing the leak alone is taken
    assert not local_correction(previous, small, fg, bg)[24:27, 40:50].any()


def test_a_negative_click_the_model_keeps_cannot_take_the_object_around_it():
    """The spleen CT of sample-data, slice 17: after a 0.97 answer, the third background click (on a leak)
    got an answer that kept the clicked pixel but removed 70 % of the spleen around it (Dice 0.97 ->
    0.46). The removal touches the click without holding it, and is as large: it is not taken either."""
    previous = np.zeros((60, 60), bool)
    previous[10:40, 10:40] = True  # the organ
    previous[24:27, 40:50] = True  # a leak to the right
    answer = previous.copy()
    answer[10:40, 22:50] = False  # the organ's right half and the leak ...
    answer[25, 46] = True  # ... but not the clicked pixel
    fg, bg = np.array([[25, 15]]), np.array([[25, 46]])
    kept = local_correction(previous, answer, fg, bg)
    assert kept[10:40, 10:40].all()
    out = respect_clicks(kept, fg, bg)
    assert out[10:40, 10:40].all() and not out[25, 46]


def test_scale_boxes_have_their_physical_size_and_are_clipped_to_the_slice():
    # 0.5 mm rows, 2 mm columns: a 10 mm box spans 20 rows and 5 columns
    boxes = boxes_at_scales((50, 50), (0.5, 2.0), (100, 100), (10.0, 20.0, 1000.0, 2000.0))
    assert boxes[0] == (40, 47, 60, 52)
    assert boxes[1] == (30, 45, 70, 55)
    assert boxes[2] == (0, 0, 99, 99)  # clipped; the 2000 mm box is the same box and is listed once
    assert len(boxes) == 3


def test_stability_prefers_a_sharp_edge():
    yy, xx = np.mgrid[:64, :64]
    distance = 20.0 - np.hypot(yy - 32, xx - 32)  # positive inside a disc of radius 20
    sharp, blurry = 8.0 * distance, 0.2 * distance
    assert stability(sharp) > 0.95
    assert stability(blurry) < stability(sharp)
    assert stability(np.full((8, 8), -5.0)) == 0.0


def test_the_scale_choice_weighs_click_answers_by_their_margins_and_drops_fragments():
    """Answers to the click itself win ties by margin / sqrt(area); a box answer that runs into its box's
    sides (a fragment of something larger) never wins, however sharp."""
    yy, xx = np.mgrid[:64, :64]

    def disc(radius: float, sharpness: float) -> np.ndarray:
        return sharpness * (radius - np.hypot(yy - 32, xx - 32))

    blurry_click, sharp_click = disc(6, 0.3), disc(6, 8.0)
    boxes = [(20, 20, 44, 44), (28, 28, 36, 36)]  # the second box cuts through a disc of radius 10
    box_answers = np.stack([disc(10, 4.0), disc(10, 8.0)])
    assert stability(box_answers[1]) >= stability(box_answers[0])
    # the sharp box answer beats a blurry click answer without margin; the fragment never counts
    assert pick_scale([(blurry_click, 0.0)], box_answers, boxes, 0.2) == 1
    # a margin large enough for the click answer's area keeps it; the second click answer can win too
    assert pick_scale([(blurry_click, 100.0)], box_answers, boxes, 0.2) == 0
    assert pick_scale([(blurry_click, 0.0), (sharp_click, 3.0)], box_answers, boxes, 0.2) == 1
    # no click answer: the best box answer that is not a fragment
    assert pick_scale([], box_answers, boxes, 0.2) == 0
    # answers over max_area (a disc of radius 10 has 305 pixels, of 6 109) are no candidates; none left: -1
    assert pick_scale([(blurry_click, 0.0)], box_answers, boxes, 0.2, max_area=200) == 0
    assert pick_scale([(blurry_click, 0.0)], box_answers, boxes, 0.2, max_area=100) == -1
    # answers that get a click wrong are no candidates: a background click on the radius-10 disc leaves the
    # radius-6 click answer, and a foreground click outside every answer leaves none
    inside, outside = np.array([[32, 32]]), np.array([[32, 40]])
    none = np.zeros((0, 2), dtype=np.int64)
    assert pick_scale([], box_answers, boxes, 0.2, honour=(inside, outside)) == -1
    assert pick_scale([(blurry_click, 0.0)], box_answers, boxes, 0.2, honour=(inside, outside)) == 0
    assert pick_scale([(sharp_click, 0.0)], box_answers, boxes, 0.2, honour=(np.array([[2, 2]]), none)) == -1


def test_a_box_is_recentred_on_its_answer_and_then_holds_the_object_a_click_off_centre_cut():
    """A click 12 pixels off a disc's centre: the box of the disc's size around the click cuts the disc, the
    same box moved onto that answer's centroid holds it (within the scale choice's contact); empty, unmoved
    and repeated boxes are left out, and a moved box is clipped to the slice. A box answer that does not
    hold the click is no candidate."""
    yy, xx = np.mgrid[:64, :64]
    disc = 14.0 - np.hypot(yy - 32, xx - 32)  # radius 14 around (32, 32)
    click = (32, 44)
    box = (17, 29, 47, 59)  # 31 pixels around the click: the disc's size, cut on its left side
    cut = np.where((xx >= 29) & (xx <= 59) & (yy >= 17) & (yy <= 47), disc, -1.0)
    assert side_contact(cut > 0, box) > 0.2
    (moved,) = recentred_boxes(cut[None], [box], (64, 64))
    assert moved[0] == 17 and moved[2] == 47 and moved[1] < 29 and moved[3] - moved[1] == 30
    whole = disc * 4.0
    # the cut fragment's centroid lies between the click and the centre: the moved box still touches the
    # disc, far less (within the scale choice's 0.2)
    assert side_contact(whole > 0, moved) <= 0.2 < side_contact(whole > 0, box)
    assert pick_scale([], np.stack([cut, whole]), [box, moved], 0.2, held=click) == 1
    # the click outside an answer: not a candidate when held is given
    assert pick_scale([], whole[None], [moved], 0.2, held=(2, 2)) == -1
    centred = np.where(np.hypot(yy - 32, xx - 44) < 5, 1.0, -1.0)  # centred on its box: does not move
    empty = np.full((64, 64), -1.0)
    assert recentred_boxes(np.stack([centred, empty]), [(27, 39, 37, 49), box], (64, 64)) == []
    assert recentred_boxes(np.stack([cut, cut]), [box, box], (64, 64)) == [moved]  # listed once
    corner = np.where(np.hypot(yy - 2, xx - 2) < 4, 1.0, -1.0)
    # moved by its answer's offset from its centre (about -9, -9), clipped: it shrinks at the slice's edge
    assert recentred_boxes(corner[None], [(1, 1, 21, 21)], (64, 64)) == [(0, 0, 12, 12)]
    # a box already on the slice's edge (clipped: not the size it stands for) is not moved
    assert recentred_boxes(corner[None], [(0, 0, 20, 20)], (64, 64)) == []
    assert recentred_boxes(corner[None, ::-1, ::-1], [(43, 43, 63, 63)], (64, 64)) == []


def test_a_click_on_the_spleens_small_tip_does_not_take_a_moved_boxs_larger_answer():
    """The spleen CT of sample-data, slice 3 (a 350-pixel tip), clicked where the evaluation's annotator
    clicks (a deepest point; its choice between near-tied scales flips a pixel away): round 28's moved
    boxes answered with the whole body (a moved slice-edge box, Dice 0.04, still 0.15 after ten clicks)
    or with a 3 000-pixel region around the tip. Moved boxes may correct the chosen answer's position,
    not its scale: at most ``lone_click_recentre_growth`` times its area."""
    from lib.core.annotator import dice
    from lib.core.config import load_profile
    from lib.core.engine import InteractiveSegmenter
    from lib.core.orientation import SliceView

    image = load_volume(SAMPLE / "spleen_ct.nii.gz")
    label = load_volume(SAMPLE / "reference" / "spleen_ct.nii.gz")
    view = SliceView.from_affine(image.affine, 2)
    pixels, gt = view.slice(image.array, 3), view.slice(label.array, 3) > 0
    profile = load_profile(APP / "configs" / "lite_medsam.toml")
    assert profile.inference.lone_click_recentre_growth == 1.5  # the opt-in's limit
    # the encoder pinned to what "auto" serves on a quiet CPU: "auto" times its runtimes, and under load it can
    # pick another, whose embedding moves this near-tied scale choice (a failure seen beside a training round)
    profile = replace(profile, inference=replace(profile.inference, lone_click_recentre=True,
                                                 encoder_runtime="openvino_mixed"))
    cache = EmbeddingCache(256)
    fg = np.array([[83, 121]])
    assert gt[83, 121]
    masks = {}
    for growth in (1.5, np.inf):
        segmenter = InteractiveSegmenter(
            replace(profile, inference=replace(profile.inference, lone_click_recentre_growth=growth)),
            device="cpu", embeddings=cache,
        )
        result = segmenter.predictor(segmenter.current()).predict(
            pixels, segmenter.window(image), view.spacing, fg, np.array([1])
        )
        assert result.mask[tuple(fg[0])]
        masks[growth] = result.mask
    assert masks[np.inf].sum() > 5 * gt.sum()  # without the limit: a moved box's answer far too large
    assert masks[1.5].sum() < 3 * gt.sum() and dice(masks[1.5], gt) > 0.6


def test_a_negative_click_deep_inside_the_answer_questions_its_scale():
    """A background click deep inside an answer that holds the foreground click says the answer is the
    wrong object or scale; one near its edge is on a leak, and one with the foreground click missed is a
    correction of another kind."""
    answer = disc((80, 80), 40, 40, 20)
    fg = np.array([[40, 40]])
    assert deep_negative(answer, fg, np.array([[40, 50]]), 0.35)  # 10 px deep, radius 20
    assert not deep_negative(answer, fg, np.array([[40, 57]]), 0.35)  # 3 px deep: a leak
    assert not deep_negative(answer, fg, np.array([[40, 70]]), 0.35)  # outside the answer
    assert not deep_negative(answer, np.array([[5, 5]]), np.array([[40, 50]]), 0.35)
    assert not deep_negative(answer, fg, np.array([[40, 50]]), 0.0)  # 0: off


def test_the_predictor_respects_every_click_on_a_real_slice(lite_model, spleen_slice):
    """Clicks the model would ignore (background deep inside the organ, foreground far outside) still
    come back as the user placed them."""
    image, gt, view, window = spleen_slice
    predictor = SlicePredictor(LoadedModel(lite_model, 0, "base"), EmbeddingCache(64), PreprocessSettings(),
                               InferenceSettings())
    rng = np.random.default_rng(1)
    inside, outside = np.argwhere(gt), np.argwhere(~gt)
    for _ in range(6):
        fg = np.concatenate([inside[rng.integers(len(inside), size=2)], outside[rng.integers(len(outside), size=1)]])
        bg = np.concatenate([inside[rng.integers(len(inside), size=1)], outside[rng.integers(len(outside), size=2)]])
        points = np.concatenate([fg, bg])
        labels = np.array([1] * len(fg) + [0] * len(bg))
        result = predictor.predict(image, window, view.spacing, points, labels)
        assert result.mask[fg[:, 0], fg[:, 1]].all()
        assert not result.mask[bg[:, 0], bg[:, 1]].any()


def test_the_next_round_is_fed_the_repairs_the_user_saw(lite_model, spleen_slice):
    """A background click the model ignores (deep inside the organ, with the organ's box) is cut out of the
    answer and out of the logits fed to the next round, so the next answer and the next correction start
    from what the user saw; with ``repair_logit = 0`` the fed logits are the model's own there."""
    from scipy import ndimage

    from lib.core.prompts import mask_box

    image, gt, view, window = spleen_slice
    core = np.argwhere(ndimage.binary_erosion(gt, iterations=6))
    click = core[len(core) // 2][None]
    fed = {}
    for value in (4.0, 0.0):
        predictor = SlicePredictor(LoadedModel(lite_model, 0, "base"), EmbeddingCache(64), PreprocessSettings(),
                                   InferenceSettings(repair_logit=value))
        result = predictor.predict(image, window, view.spacing, click, np.array([0]), box_rc=mask_box(gt))
        assert not result.mask[click[0, 0], click[0, 1]]
        _, frame, _, _ = predictor.embed(image, window, view.spacing)
        fed[value] = frame.logits_to_slice(result.low_res_logits)[0, 0].numpy()[click[0, 0], click[0, 1]]
    assert fed[0.0] > 0  # the model's own answer kept the clicked pixel: the repair alone removed it
    assert fed[4.0] < 0  # and the next round is told so


def test_a_lone_click_on_a_large_organ_is_answered_at_the_organs_scale():
    """The served model (shipped click adapter): one click on the spleen, answered at the scale chosen among
    boxes around it, finds much more of the organ than the click alone (the click alone: 0.16 mean Dice on
    these five slices)."""
    from lib.core.annotator import dice, interior_point
    from lib.core.config import load_profile
    from lib.core.engine import InteractiveSegmenter
    from lib.core.prompts import parse_prompts

    image = load_volume(SAMPLE / "spleen_ct.nii.gz")
    label = load_volume(SAMPLE / "reference" / "spleen_ct.nii.gz").array > 0
    profile = load_profile(APP / "configs" / "lite_medsam.toml")
    cache = EmbeddingCache(256)
    grown = InteractiveSegmenter(profile, device="cpu", embeddings=cache)
    alone = InteractiveSegmenter(replace(profile, inference=replace(profile.inference, lone_click_scales_mm=())),
                                 device="cpu", embeddings=cache)
    scores = {"grown": [], "alone": []}
    for k in (6, 9, 12, 15, 18):
        gt = label[:, :, k]
        click = parse_prompts({"foreground": [[*interior_point(gt), k]]}, image.shape)
        for name, segmenter in (("grown", grown), ("alone", alone)):
            out = segmenter.segment(image, click, three_d=False)
            scores[name].append(dice(out.label[:, :, k] > 0, gt))
    assert all(g >= a for g, a in zip(scores["grown"], scores["alone"], strict=True)), scores
    assert np.mean(scores["grown"]) >= np.mean(scores["alone"]) + 0.25, scores


def test_a_lone_click_on_a_whole_ct_slice_can_be_refitted_to_its_answers_own_box():
    """The dcmqi liver of sample-data (512 x 512 CT slices, larger than the model's input; in no training or
    held-out set). With the opt-in ``lone_click_refit = 0.5`` the bare model's answer to the tight box of the
    lone click's chosen answer replaces it where it agrees: one click finds more of the liver (round 31,
    slices 1 and 2: Dice 0.85 / 0.80 -> 0.91 / 0.91), and the answer holds the click."""
    from lib.core.annotator import dice, interior_point
    from lib.core.config import load_profile
    from lib.core.datasets import dicom_series_with_seg
    from lib.core.engine import InteractiveSegmenter
    from lib.core.prompts import parse_prompts

    dicom = SAMPLE / "dicom"
    case = dicom_series_with_seg(dicom / "ct_dcmqi_3slice", dicom / "ct_dcmqi_seg" / "liver.dcm", "dcmqi")
    label = case.label.array > 0
    profile = load_profile(APP / "configs" / "lite_medsam.toml")
    assert profile.inference.lone_click_refit == 0.0  # opt-in
    cache = EmbeddingCache(256)
    segmenters = {
        refit: InteractiveSegmenter(replace(profile, inference=replace(profile.inference, lone_click_refit=refit)),
                                    device="cpu", embeddings=cache)
        for refit in (0.5, 0.0)
    }
    for k in (1, 2):
        gt = label[:, :, k]
        click = interior_point(gt)
        prompt = parse_prompts({"foreground": [[*click, k]]}, case.image.shape)
        scores = {}
        for refit, segmenter in segmenters.items():
            answer = segmenter.segment(case.image, prompt, three_d=False).label[:, :, k] > 0
            assert answer[click]
            scores[refit] = dice(answer, gt)
        assert scores[0.5] >= scores[0.0] + 0.04 and scores[0.5] > 0.88, (k, scores)


def test_a_deep_negative_click_on_an_answer_far_too_large_chooses_the_scale_again():
    """The spleen CT of sample-data, slice 3 (350 pixels): with the bf16 decoder the lone click's near-tied
    scale choice took the bare model's 4 800-pixel answer to the 80 mm box around the click, the negative
    click deep inside it only cut a hole there, and ten clicks reached Dice 0.39 (0.89 from the fp32
    decoder's first answer). Given that first correction, the shipped model with ``scale_recheck_depth =
    0.35`` (round 26, opt-in) chooses the click's scale again among the answers that honour both clicks."""
    from lib.core.annotator import dice, interior_point
    from lib.core.config import load_profile
    from lib.core.engine import InteractiveSegmenter
    from lib.core.orientation import SliceView

    image = load_volume(SAMPLE / "spleen_ct.nii.gz")
    label = load_volume(SAMPLE / "reference" / "spleen_ct.nii.gz")
    view = SliceView.from_affine(image.affine, 2)
    pixels, gt = view.slice(image.array, 3), view.slice(label.array, 3) > 0
    profile = load_profile(APP / "configs" / "lite_medsam.toml")
    cache = EmbeddingCache(256)
    segmenters = {
        depth: InteractiveSegmenter(replace(profile, inference=replace(profile.inference, scale_recheck_depth=depth)),
                                    device="cpu", embeddings=cache)
        for depth in (0.35, 0.0)
    }
    first = segmenters[0.35]
    window = first.window(image)
    fg = np.array([interior_point(gt)])
    box = boxes_at_scales(tuple(fg[0]), view.spacing, gt.shape, (80.0,))[0]
    too_large = first.predictor(first.bare_model()).predict(pixels, window, view.spacing, box_rc=box)
    assert too_large.mask.sum() > 10 * gt.sum() and too_large.mask[tuple(fg[0])]
    bg = np.array([interior_point(too_large.mask & ~gt)])  # the annotator's negative click
    answers = {}
    for depth, segmenter in segmenters.items():
        result = segmenter.predictor(segmenter.current()).predict(
            pixels, window, view.spacing, np.concatenate([fg, bg]), np.array([1, 0]),
            mask_logits=too_large.low_res_logits,
        )
        assert result.mask[tuple(fg[0])] and not result.mask[tuple(bg[0])]
        answers[depth] = result.mask
    rechecked, kept, too_large = answers[0.35], answers[0.0], too_large.mask
    assert kept.sum() > 0.7 * too_large.sum() and dice(kept, gt) < 0.3  # a hole cut around the click
    assert rechecked.sum() < 0.3 * too_large.sum() and dice(rechecked, gt) > 0.6
