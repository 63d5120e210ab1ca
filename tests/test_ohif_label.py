"""OHIF's raw labelmap (``label.bin``, what the MONAI Label panel's ``save_label`` sends) saved over
HTTP into a local datastore: placed into the image's grid by the viewer's description of its volume
(also when the viewer's slices run the other way), renumbered by ``label_info``, bad input refused."""

from __future__ import annotations

import json

import numpy as np
import requests

from conftest import SAMPLE

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def viewer_grid(affine: np.ndarray, shape: tuple[int, ...], flip_k: bool = False) -> dict:
    """A cornerstone volume's grid description (LPS) of an image, optionally with the slices reversed."""
    lps = RAS_TO_LPS @ affine
    steps = lps[:3, :3].copy()
    origin = lps[:3, 3].copy()
    if flip_k:
        origin = origin + steps[:, 2] * (shape[2] - 1)
        steps[:, 2] = -steps[:, 2]
    spacing = np.linalg.norm(steps, axis=0)
    return {
        "dimensions": list(shape),
        "spacing": spacing.tolist(),
        "origin": origin.tolist(),
        "direction": (steps / spacing).T.reshape(-1).tolist(),
    }


def put_raw(url: str, image: str, raw: bytes, params: dict) -> requests.Response:
    return requests.put(
        f"{url}/datastore/label",
        params={"image": image},
        files={"label": ("label.bin", raw), "params": (None, json.dumps(params))},
        timeout=120,
    )


def test_raw_labelmap_is_placed_into_the_image_grid(server):
    from lib.core.volume import load_volume

    image = load_volume(SAMPLE / "spleen_ct.nii.gz")
    truth = np.zeros(image.shape, np.uint8)
    truth[10:30, 20:40, 3:6] = 1  # asymmetric in k: a mirror would be caught
    viewer = np.where(truth > 0, 7, 0).astype(np.uint8)  # the viewer's segment index 7 is "spleen"
    info = [{"name": "liver", "idx": 3}, {"name": "spleen", "idx": 7}]  # liver has no voxels: left out

    grid = viewer_grid(image.affine, image.shape, flip_k=True)
    raw = viewer[:, :, ::-1].tobytes(order="F")
    r = put_raw(server.url, "spleen_ct", raw, {"label_info": info, "ohif_grid": grid})
    assert r.status_code == 200, r.text
    stored = load_volume(server.studies / "labels" / "final" / "spleen_ct.nii.gz")
    assert np.array_equal(stored.array, truth), "the reversed slices were not put back in the image's order"
    assert np.allclose(stored.affine, image.affine, atol=1e-4)
    meta = requests.get(f"{server.url}/datastore/label/info", params={"label": "spleen_ct", "tag": "final"}, timeout=30)
    assert meta.json()["label_info"] == [{"name": "spleen", "idx": 1}], meta.json()

    # without a grid description: the image's own order (as the server's raw NRRD answers)
    r = put_raw(server.url, "spleen_ct", viewer.tobytes(order="F"), {"label_info": info})
    assert r.status_code == 200, r.text
    assert np.array_equal(load_volume(server.studies / "labels" / "final" / "spleen_ct.nii.gz").array, truth)


def test_bad_raw_labelmaps_get_422_and_change_nothing(server):
    from lib.core.volume import load_volume

    image = load_volume(SAMPLE / "spleen_ct.nii.gz")
    label = np.zeros(image.shape, np.uint8)
    label[5:9, 5:9, 2] = 2
    raw = label.tobytes(order="F")
    spleen = [{"name": "spleen", "idx": 2}]
    shifted = viewer_grid(image.affine, image.shape)
    shifted["origin"][2] += 5 * float(np.linalg.norm(image.affine[:3, 2]))
    wrong_shape = viewer_grid(image.affine, image.shape)
    wrong_shape["dimensions"][2] += 1
    cases = {
        "bytes": (raw[:-1], {"label_info": spleen}),
        "unnamed value": (raw, {"label_info": [{"name": "liver", "idx": 1}]}),
        "no label_info": (raw, {}),
        "empty": (bytes(len(raw)), {"label_info": spleen}),
        "shifted grid": (raw, {"label_info": spleen, "ohif_grid": shifted}),
        "other grid": (raw, {"label_info": spleen, "ohif_grid": wrong_shape}),
    }
    target = server.studies / "labels" / "final" / "spleen_ct.nii.gz"
    before = target.read_bytes() if target.exists() else None
    for what, (body, params) in cases.items():
        r = put_raw(server.url, "spleen_ct", body, params)
        assert r.status_code == 422, f"{what}: {r.status_code} {r.text}"
        assert r.json()["detail"], what
    assert (target.read_bytes() if target.exists() else None) == before, "a refused upload changed the label"
    assert put_raw(server.url, "no_such_image", raw, {"label_info": spleen}).status_code == 404
