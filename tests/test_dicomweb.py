"""A PACS in the loop: Orthanc with DICOMweb, the real server on it, results in the series' geometry,
final labels stored back as DICOM-SEG that decode to the submitted mask.

Orthanc comes from Debian (``apt-get install orthanc orthanc-dicomweb``, done by ``.ci/run``); the
DICOM series and SEG files are the shipped ones in ``sample-data/dicom``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from live_server import ORTHANC, Orthanc

from conftest import APP, DICOM, Server, series_geometry, series_uid

pytestmark = pytest.mark.skipif(
    not ORTHANC.is_file(), reason="Orthanc not installed (apt-get install -y orthanc orthanc-dicomweb; .ci/run does)"
)


def seg_in_grid(seg_file: Path, shape: tuple[int, int, int], affine: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
    """A DICOM-SEG decoded and placed voxel by voxel into a grid, with its segment names."""
    from lib.core.dicom_seg import read_seg
    from lib.core.volume import Volume, label_in_grid

    label, names = read_seg(seg_file)
    return label_in_grid(label, Volume(np.zeros(shape, np.uint8), affine)).array, names


def read_nrrd(content: bytes) -> tuple[np.ndarray, np.ndarray]:
    from lib.core.volume import volume_from_bytes

    volume = volume_from_bytes(content, ".nrrd")
    return volume.array, volume.affine


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    base = tmp_path_factory.mktemp("pacs")
    orthanc = Orthanc(base)
    try:
        orthanc.upload(DICOM)
        app_dir = base / "app"
        shutil.copytree(APP, app_dir, ignore=shutil.ignore_patterns("model", "__pycache__", "logs"))
        server = Server(orthanc.dicomweb, app_dir, base / "server.log")
        yield orthanc, server
        server.stop()
    finally:
        orthanc.stop()


def test_infer_on_a_series_answers_in_the_series_geometry(pacs):
    orthanc, server = pacs
    folder = DICOM / "ct_spleen_converted"
    uid = series_uid(folder)
    listed = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=60)
    assert listed.status_code == 200
    shape, affine = series_geometry(folder)
    manual, names = seg_in_grid(next((DICOM / "ct_spleen_converted_seg").glob("*.dcm")), shape, affine)
    assert list(names.values()) == ["spleen"]
    k = int(np.argmax(manual.sum(axis=(0, 1))))
    i, j = (int(v) for v in np.argwhere(manual[:, :, k] > 0).mean(axis=0).round())
    # OHIF's request: raw NRRD copied straight into its labelmap
    params = {
        "foreground": [[i, j, k]],
        "result_extension": ".nrrd",
        "result_compress": False,
        "restore_label_idx": False,
        "client_id": "ohif",
    }
    deepedit = {**params, "spleen": [[i, j, k]], "background": [], "label": "spleen"}
    for task in ("medsam_2d", "medsam_3d", "medsam_deepedit"):
        body = deepedit if task == "medsam_deepedit" else params
        r = requests.post(
            f"{server.url}/infer/{task}",
            params={"image": uid, "output": "image"},
            files={"params": (None, json.dumps(body))},
            timeout=600,
        )
        assert r.status_code == 200, r.text
        assert b"encoding: raw" in r.content[:1000]
        mask, mask_affine = read_nrrd(r.content)
        assert mask.shape == shape, f"{task}: result grid {mask.shape} is not the series' {shape}"
        np.testing.assert_allclose(mask_affine, affine, atol=1e-3)
        on_slice = (mask[:, :, k] > 0) & (manual[:, :, k] > 0)
        assert on_slice.sum() > 0.5 * (mask[:, :, k] > 0).sum(), f"{task}: the mask is not on the spleen"
        if task == "medsam_2d":
            assert not np.delete(mask, k, axis=2).any(), "2D result outside the prompted slice"
        else:
            assert (mask.sum(axis=(0, 1)) > 0).sum() > 5, "3D result did not propagate"
    assert (
        requests.post(
            f"{server.url}/infer/medsam_2d", params={"image": "1.2.3.4"}, files={"params": (None, "{}")}, timeout=60
        ).status_code
        == 404
    )


def test_final_label_is_stored_as_seg_that_decodes_to_the_mask(pacs):
    orthanc, server = pacs
    folder = DICOM / "ct_spleen_converted"
    uid = series_uid(folder)
    shape, affine = series_geometry(folder)
    manual, _ = seg_in_grid(next((DICOM / "ct_spleen_converted_seg").glob("*.dcm")), shape, affine)
    # an annotator's corrected label: the manual spleen, minus its first labelled slice
    label = (manual > 0).astype(np.uint8)
    label[:, :, int(np.nonzero(label.any(axis=(0, 1)))[0][0])] = 0
    from lib.core.volume import write_label

    path = Path(tempfile.mkdtemp()) / "label.nrrd"
    write_label(label, affine, path)
    before = {s["0020000E"]["Value"][0] for s in orthanc.series("SEG")}
    r = requests.put(
        f"{server.url}/datastore/label",
        params={"image": uid},
        files={
            "label": ("label.nrrd", path.read_bytes()),
            "params": (None, json.dumps({"label_info": [{"name": "spleen", "idx": 1}]})),
        },
        timeout=300,
    )
    assert r.status_code == 200, r.text
    new = [s for s in orthanc.series("SEG") if s["0020000E"]["Value"][0] not in before]
    assert len(new) == 1, "no new SEG series in Orthanc"
    seg_uid = new[0]["0020000E"]["Value"][0]
    found = requests.post(f"{orthanc.url}/tools/lookup", data=seg_uid, timeout=30).json()
    instances = requests.get(f"{orthanc.url}/series/{found[0]['ID']}/instances", timeout=30).json()
    seg_file = Path(tempfile.mkdtemp()) / "seg.dcm"
    seg_file.write_bytes(requests.get(f"{orthanc.url}/instances/{instances[0]['ID']}/file", timeout=30).content)
    dcm = pydicom.dcmread(seg_file)
    assert dcm.Modality == "SEG"
    assert str(dcm.ReferencedSeriesSequence[0].SeriesInstanceUID) == uid, "the SEG must reference the source series"
    decoded, names = seg_in_grid(seg_file, shape, affine)
    assert list(names.values()) == ["spleen"]
    assert np.array_equal(decoded > 0, label > 0), "the stored SEG does not decode to the submitted mask"


def test_seg_series_in_the_pacs_count_as_labels(pacs):
    orthanc, server = pacs
    r = requests.get(f"{server.url}/datastore/", params={"output": "train"}, timeout=600)
    assert r.status_code == 200, r.text
    pairs = r.json()
    labelled = {Path(p["image"]).name.split(".nii")[0] for p in pairs}
    assert series_uid(DICOM / "ct_spleen_converted") in labelled
    assert series_uid(DICOM / "ct_dcmqi_3slice") in labelled, "the manual liver SEG (dcmqi) is a label too"
    assert all(Path(p["label"]).is_file() for p in pairs)


def test_a_training_round_learns_from_the_segs_in_the_pacs(pacs):
    """The manual liver SEG (dcmqi) and the newest spleen SEG (saved above) are the training labels."""
    from test_server_training import wait_for_training

    orthanc, server = pacs
    options = {"max_epochs": 1, "max_slices_per_volume": 2, "publish": "always"}
    r = requests.post(f"{server.url}/train/medsam", json=options, timeout=60)
    assert r.status_code == 200, r.text
    task = wait_for_training(server.url)
    assert task["status"] == "DONE", task
    stats = requests.get(f"{server.url}/info/", timeout=60).json()["train_stats"]["medsam"]
    listed = next(n for n in stats["notes"] if "DICOM-SEG" in n)
    assert series_uid(DICOM / "ct_spleen_converted") in listed and series_uid(DICOM / "ct_dcmqi_3slice") in listed
    assert stats["published_version"] == 1, stats["notes"]

    # the round trained the prompt-free head on the SEGs' names: the automatic task answers on a series
    uid = series_uid(DICOM / "ct_dcmqi_3slice")
    r = requests.post(
        f"{server.url}/infer/medsam_auto",
        params={"image": uid, "output": "image"},
        files={"params": (None, json.dumps({"result_extension": ".nrrd", "result_compress": False}))},
        timeout=600,
    )
    assert r.status_code == 200, r.text
    label, label_affine = read_nrrd(r.content)
    shape, affine = series_geometry(DICOM / "ct_dcmqi_3slice")
    assert label.shape == shape
    np.testing.assert_allclose(label_affine, affine, atol=1e-3)


def test_a_pacs_seg_with_several_segments_reads_into_its_series(tmp_path):
    """TotalSegmentator's SEG of a 512x512 CT series (model output, four organs): names and placement."""
    from conftest import shared

    series = shared("dicom", "ct_totalseg_series")
    seg = next(shared("dicom", "ct_totalseg_seg").glob("*.dcm"))
    shape, affine = series_geometry(series)
    label, names = seg_in_grid(seg, shape, affine)
    assert sorted(names.values()) == ["aorta", "liver", "spleen", "stomach"]
    present = {names[v] for v in np.unique(label) if v}
    assert present == set(names.values()), f"segments missing after placement: {set(names.values()) - present}"
