"""End to end against the real ``monailabel start_server``, speaking as 3D Slicer and OHIF do.

Slicer's plugin talks through ``monailabel.client.MONAILabelClient`` (shipped in the wheel); OHIF posts
multipart ``params`` with ``output=image`` and copies the raw NRRD bytes into its labelmap.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import requests
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from conftest import APP, SAMPLE
from lib.core.volume import load_volume

SPLEEN = "spleen_ct"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


@pytest.fixture(scope="module")
def slicer(server):
    return MONAILabelClient(server.url, tmpdir=tempfile.mkdtemp(), client_id="slicer-test")


@pytest.fixture(scope="module")
def spleen_label():
    return nib.load(str(SAMPLE / "reference" / "spleen_ct.nii.gz")).get_fdata() > 0


def slicer_infer(client, model, image, params):
    params = {"result_extension": ".nrrd", "result_dtype": "uint8", **params}
    path, result = client.infer(model, image, params)
    return load_volume(path), json.loads(result) if isinstance(result, str) else result


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    }


def test_info_lists_tasks_with_client_facing_types(slicer):
    models = slicer.info()["models"]
    assert models["medsam_2d"]["type"] == "deepgrow" and models["medsam_2d"]["dimension"] == 2
    assert models["medsam_3d"]["type"] == "deepgrow" and models["medsam_3d"]["dimension"] == 3
    assert models["medsam_deepedit"]["type"] == "deepedit" and "spleen" in models["medsam_deepedit"]["labels"]
    assert models["medsam_auto"]["type"] == "segmentation"


def test_slicer_box_matches_the_predictor_and_swapped_roi_is_the_same(slicer, spleen_label, lite_model):
    from lib.core.cache import EmbeddingCache
    from lib.core.config import InferenceSettings, PreprocessSettings
    from lib.core.orientation import SliceView
    from lib.core.predictor import LoadedModel, SlicePredictor
    from lib.core.preprocess import choose_window

    k = 13
    ii, jj = np.nonzero(spleen_label[:, :, k])
    roi = [int(ii.min()), int(ii.max()), int(jj.min()), int(jj.max()), k, k]
    swapped = [roi[1], roi[0], roi[3], roi[2], k, k]
    a, params = slicer_infer(slicer, "medsam_2d", SPLEEN, {"roi": roi, "slice": k, "label": "spleen"})
    b, _ = slicer_infer(
        slicer, "medsam_2d", SPLEEN, {"roi": swapped, "slice": k, "label": "spleen", "reset_state": True}
    )
    np.testing.assert_array_equal(a.array, b.array)
    assert set(np.nonzero(a.array)[2]) == {k}, "a 2D task must fill only the prompted slice"
    # the same prompt through the in-process predictor
    image = load_volume(SAMPLE / f"{SPLEEN}.nii.gz")
    view = SliceView.from_affine(image.affine, 2)
    # the server serves the shipped click adapter, which leaves a box alone to the bare base model
    predictor = SlicePredictor(LoadedModel(lite_model, 0, "base"), EmbeddingCache(16), PreprocessSettings(),
                               InferenceSettings())
    box = view.display_box((roi[0], roi[2]), (roi[1], roi[3]), image.shape)
    own = view.from_display(
        predictor.predict(
            view.slice(image.array, k), choose_window(image.array, PreprocessSettings()), view.spacing, box_rc=box
        ).mask
    )
    gt = spleen_label[:, :, k]
    served = a.array[:, :, k] > 0
    assert dice(served, own) >= 0.99
    assert abs(dice(served, gt) - dice(own, gt)) < 0.01 and dice(served, gt) > 0.9
    assert params["model_version"] == "shipped" and "latency_ms" in params


def test_slicer_click_sequence_refines_on_one_slice(slicer, spleen_label):
    k = 12
    inside = np.argwhere(spleen_label[:, :, k])
    fg = [int(v) for v in inside[len(inside) // 2]] + [k]
    clicks = {"foreground": [fg], "background": [], "slice": k, "label": "spleen", "reset_state": True}
    first, p1 = slicer_infer(slicer, "medsam_2d", SPLEEN, clicks)
    clicks.update(background=[[5, 5, k]], reset_state=False)
    second, p2 = slicer_infer(slicer, "medsam_2d", SPLEEN, clicks)
    # the shipped click adapter was trained with mask prompts: the second request refines the first
    assert not p1["refined_with_previous_logits"] and p2["refined_with_previous_logits"]
    assert p2["embedding_cached"] and p2["latency_ms"]["encoder"] == 0
    assert first.array[:, :, k].any() and second.array[:, :, k].any()
    for vol in (first, second):
        assert set(np.nonzero(vol.array)[2]) <= {k}
    # the clicks mean what the annotator meant: the foreground voxel is in, the background voxel out
    assert first.array[tuple(fg)] and second.array[tuple(fg)] and not second.array[5, 5, k]
    # even a background click placed inside the organ is respected, and the foreground one stays in
    inner = [int(v) for v in inside[len(inside) // 3]] + [k]
    third, _ = slicer_infer(slicer, "medsam_2d", SPLEEN, {**clicks, "background": [[5, 5, k], inner]})
    assert third.array[tuple(fg)] and not third.array[tuple(inner)] and not third.array[5, 5, k]
    # box plus clicks, as a new session (a box added to a running click session is refined from the
    # earlier click masks, which the shipped adapter does less well: see the README's known limits)
    ii, jj = np.nonzero(spleen_label[:, :, k])
    roi = [int(ii.min()), int(ii.max()), int(jj.min()), int(jj.max()), k, k]
    both, _ = slicer_infer(slicer, "medsam_2d", SPLEEN, {**clicks, "roi": roi, "reset_state": True})
    assert dice(both.array[:, :, k] > 0, spleen_label[:, :, k]) > 0.85


def test_slicer_3d_from_one_box_on_the_middle_slice(slicer, spleen_label):
    ks = np.nonzero(spleen_label.any(axis=(0, 1)))[0]
    mid = int(ks[len(ks) // 2])
    ii, jj = np.nonzero(spleen_label[:, :, mid])
    roi = [int(ii.min()), int(ii.max()), int(jj.min()), int(jj.max()), mid, mid]
    vol, params = slicer_infer(slicer, "medsam_3d", SPLEEN, {"roi": roi, "label": "spleen"})
    assert dice(vol.array > 0, spleen_label) >= 0.90
    lo, hi = params["slice_range"]
    assert lo < mid < hi and params["slices_segmented"] == hi - lo + 1


@pytest.mark.parametrize("image", ["spleen_ct", "abdomen_mr", "spine_t2_sct"])  # RAS, LPS, PSR storage
def test_result_has_exactly_the_image_geometry(slicer, image):
    ref = load_volume(SAMPLE / f"{image}.nii.gz")
    centre = [s // 2 for s in ref.shape]
    vol, _ = slicer_infer(slicer, "medsam_2d", image, {"foreground": [centre], "slice": centre[2]})
    assert vol.shape == ref.shape
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-4)
    assert vol.array.dtype == np.uint8 and vol.array[tuple(centre)] in (0, 1)
    # the same click again (a fresh session: a repeated click would otherwise refine the first answer)
    nii, _ = slicer_infer(
        slicer, "medsam_2d", image, {"foreground": [centre], "result_extension": ".nii.gz", "reset_state": True}
    )
    np.testing.assert_allclose(nii.affine, ref.affine, atol=1e-4)
    np.testing.assert_array_equal(nii.array, vol.array)


def ohif_infer(server, model, image, params):
    body = {
        "result_extension": ".nrrd",
        "result_dtype": "uint8",
        "result_compress": False,
        "restore_label_idx": False,
        **params,
    }
    return requests.post(
        f"{server.url}/infer/{model}",
        params={"image": image, "output": "image"},
        files={"params": (None, json.dumps(body))},
        timeout=300,
    )


def test_ohif_point_prompt_returns_raw_nrrd_in_the_image_grid(server, slicer, spleen_label, tmp_path):
    k = 12
    inside = np.argwhere(spleen_label[:, :, k])
    fg = [int(v) for v in inside[len(inside) // 2]] + [k]
    for model in ("medsam_2d", "medsam_3d"):
        answer = ohif_infer(server, model, SPLEEN, {"foreground": [fg], "background": []})
        assert answer.status_code == 200, answer.text
        path = tmp_path / f"{model}.nrrd"
        path.write_bytes(answer.content)
        data, header = nrrd.read(str(path))
        assert header["encoding"] == "raw" and header["type"] in ("unsigned char", "uint8")
        assert data.shape == spleen_label.shape
        assert (data[:, :, k] > 0)[spleen_label[:, :, k]].any(), "the click's mask must overlap the spleen"
        # OHIF and Slicer get the same mask for the same prompt
        same, _ = slicer_infer(slicer, model, SPLEEN, {"foreground": [fg], "background": [], "client_id": "ohif"})
        np.testing.assert_array_equal(data, same.array)


def test_bad_requests_get_4xx_with_a_reason_and_change_nothing(server, slicer, tmp_path):
    before = snapshot(server.studies)
    url = f"{server.url}/infer"

    def post(model, image, params, **kw):
        return requests.post(
            f"{url}/{model}", params={"image": image, **kw}, files={"params": (None, json.dumps(params))}, timeout=120
        )

    cases = [
        (post("medsam_2d", "no_such_image", {"foreground": [[1, 1, 1]]}), 404, "unknown image"),
        (post("no_such_model", SPLEEN, {"foreground": [[1, 1, 1]]}), 404, "unknown model"),
        (post("medsam_2d", SPLEEN, {"foreground": [[1000, 1, 1]]}), 422, "outside the image"),
        (post("medsam_2d", SPLEEN, {"foreground": [[-1, 1, 1]]}), 422, "outside the image"),
        (post("medsam_2d", SPLEEN, {"roi": [10, 10, 5, 60, 3, 3]}), 422, "degenerate"),
        (post("medsam_2d", SPLEEN, {"foreground": "12,3,4"}), 422, "list"),
        (post("medsam_2d", SPLEEN, {"foreground": [["a", 1, 1]]}), 422, "number"),
        (post("medsam_2d", SPLEEN, {"foreground": [[1, 1, 1]], "slice": "middle"}), 422, "slice"),
        (post("medsam_2d", SPLEEN, {}), 422, "no prompt"),
        (post("medsam_3d", SPLEEN, {"background": [[3, 3, 3]]}), 422, "foreground"),
        (post("medsam_deepedit", SPLEEN, {"background": [[3, 3, 3]]}), 422, "no clicks"),
        # (medsam_auto answers on a fresh install: the shipped prompt-free head, tests/test_designs.py)
        (post("medsam_auto", SPLEEN, {"window": "disco"}), 422, "window"),
        (post("medsam_2d", SPLEEN, {"foreground": [[50, 50, 5]], "result_extension": ".exe"}), 422, "result_extension"),
        (post("medsam_2d", SPLEEN, {"foreground": [[50, 50, 5]], "window": "disco"}), 422, "window"),
    ]
    for response, status, words in cases:
        assert response.status_code == status, (response.status_code, response.text)
        assert words in response.json()["detail"], response.text
    # a 4D image uploaded with the request
    path = tmp_path / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.float32), np.eye(4)), path)
    with open(path, "rb") as fh:
        response = requests.post(
            f"{url}/medsam_2d",
            files={"params": (None, json.dumps({"foreground": [[1, 1, 1]]})), "file": ("four_d.nii.gz", fh)},
            timeout=60,
        )
    assert response.status_code == 415 and "3D" in response.json()["detail"]
    # the client library sees the same as an exception with the status
    with pytest.raises(MONAILabelClientException) as err:
        slicer.infer("medsam_2d", SPLEEN, {"foreground": [[1000, 0, 0]]})
    assert "Status: 422" in str(err.value) and "outside the image" in str(err.value)
    # still serving, nothing written
    assert requests.get(f"{server.url}/info/", timeout=10).ok
    assert snapshot(server.studies) == before


def test_deepedit_clicks_per_label_give_a_multi_label_result(slicer, spleen_label):
    ks = np.nonzero(spleen_label.any(axis=(0, 1)))[0]
    mid = int(ks[len(ks) // 2])
    ii, jj = np.nonzero(spleen_label[:, :, mid])
    roi = [int(ii.min()), int(ii.max()), int(jj.min()), int(jj.max()), mid, mid]
    inside = np.argwhere(spleen_label[:, :, mid])
    click = [int(v) for v in inside[len(inside) // 2]] + [mid]
    params = {"spleen": [click], "liver": [], "background": [], "roi": roi, "label": "spleen"}
    vol, result = slicer_infer(slicer, "medsam_deepedit", SPLEEN, params)
    values = set(np.unique(vol.array).tolist())
    assert values <= {0, 1}, "spleen must be written with its label index (1)"
    assert dice(vol.array == 1, spleen_label) >= 0.85
    assert set(result["labels"]) == {"spleen"} and result["label_names"]["spleen"] == 1


def test_evaluation_over_http_measures_what_the_engine_gives(server):
    """The evaluation suite as a client of the live server scores the same as in-process."""
    from lib.core.config import load_profile
    from lib.core.datasets import load_dataset
    from lib.core.engine import InteractiveSegmenter
    from lib.core.eval_backends import HttpBackend, InProcessBackend
    from lib.core.evaluation import EvalSettings, evaluate_cases

    (case,) = [c for c in load_dataset(SAMPLE, SAMPLE / "reference") if c.case_id == SPLEEN]
    settings = EvalSettings(max_clicks=3, max_slices_per_structure=1, three_d=False)
    over_http, _ = evaluate_cases(HttpBackend(server.url), [case], settings)
    engine = InteractiveSegmenter(load_profile(APP / "configs" / "lite_medsam.toml"), device="cpu")
    in_process, _ = evaluate_cases(InProcessBackend(engine), [case], settings)
    (a,), (b,) = over_http, in_process
    assert a.slice == b.slice and a.box_dice > 0.7
    assert a.box_dice == pytest.approx(b.box_dice, abs=0.01)
    assert a.click_dice == pytest.approx(b.click_dice, abs=0.02)
    assert len(a.latency_ms["end_to_end"]) == 2 + 3 and len(a.latency_ms["decoder"]) == 2 + 3
