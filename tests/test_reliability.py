"""Hostile input, many annotators at once, labels that survive a killed server: against the real server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import APP, SAMPLE, Server, studies_copy

UPLOAD_LIMIT_MB = 4
SPLEEN_SHAPE = (164, 166, 26)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    base = tmp_path_factory.mktemp("guarded")
    app_dir = base / "app"
    shutil.copytree(APP, app_dir, ignore=shutil.ignore_patterns("model", "__pycache__", "logs"))
    server = Server(
        studies_copy(base / "studies"), app_dir, base / "server.log", {"max_upload_mb": str(UPLOAD_LIMIT_MB)}
    )
    yield server
    server.stop()


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of the datastore (but its lock) with its content."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def infer(url: str, model: str, image: str, params: object, output: str = "image", timeout: float = 300):
    body = params if isinstance(params, str) else json.dumps(params)
    return requests.post(
        f"{url}/infer/{model}",
        params={"image": image, "output": output},
        files={"params": (None, body)},
        timeout=timeout,
    )


def decoded_mask(response: requests.Response, suffix: str = ".nrrd") -> np.ndarray:
    from lib.core.volume import volume_from_bytes

    return volume_from_bytes(response.content, suffix).array


def nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    with tempfile.NamedTemporaryFile(suffix=".nii.gz") as fh:
        nib.save(nib.Nifti1Image(array, affine), fh.name)
        return Path(fh.name).read_bytes()


def spleen_label(dtype=np.uint8) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(SAMPLE / "reference" / "spleen_ct.nii.gz"))
    return (np.asarray(img.dataobj) == 1).astype(dtype), img.affine


def save_label(url: str, image: str, data: bytes, filename: str = "label.nii.gz", params: str = "{}", tag: str = ""):
    query = {"image": image} | ({"tag": tag} if tag else {})
    return requests.put(
        f"{url}/datastore/label",
        params=query,
        files={"label": (filename, data), "params": (None, params)},
        timeout=120,
    )


def hostile_requests() -> list[tuple[str, callable]]:
    """(what, request) pairs that a careless or hostile client may send; each must get a 4xx."""
    good, affine = spleen_label()
    shifted = affine.copy()
    shifted[:3, 3] += 5.0
    image = (SAMPLE / "spleen_ct.nii.gz").read_bytes()

    def post_params(text: str):
        return lambda url: infer(url, "medsam_2d", "spleen_ct", text)

    return [
        ("malformed JSON", post_params("{'foreground': [[1, 2, 3]]")),
        ("JSON list", post_params("[1, 2, 3]")),
        ("JSON number", post_params("42")),
        ("JSON string", post_params('"roi"')),
        ("wrong types", post_params(json.dumps({"foreground": "here", "roi": {"a": 1}}))),
        ("huge coordinates", post_params(json.dumps({"foreground": [[10**12, 80, 10]]}))),
        ("negative coordinates", post_params(json.dumps({"foreground": [[-1, 80, 10]]}))),
        ("non-finite box", post_params('{"roi": [0, NaN, 0, 10, 3, 3]}')),
        ("unknown model", lambda url: infer(url, "medsam_9d", "spleen_ct", {"foreground": [[80, 80, 10]]})),
        ("image id with ../", lambda url: infer(url, "medsam_2d", "../studies/spleen_ct", {"foreground": [[8, 8, 1]]})),
        ("absolute image path", lambda url: infer(url, "medsam_2d", "/etc/passwd", {"foreground": [[8, 8, 1]]})),
        ("label for ../ image", lambda url: save_label(url, "../spleen_ct", nifti_bytes(good, affine))),
        ("label tag with ../", lambda url: save_label(url, "spleen_ct", nifti_bytes(good, affine), tag="../../x")),
        ("label of wrong shape", lambda url: save_label(url, "spleen_ct", nifti_bytes(good[:, :, :10], affine))),
        ("label of wrong geometry", lambda url: save_label(url, "spleen_ct", nifti_bytes(good, shifted))),
        ("label with fractions", lambda url: save_label(url, "spleen_ct", nifti_bytes(good * 0.5, affine))),
        ("label with negatives", lambda url: save_label(url, "spleen_ct", nifti_bytes(-good.astype(np.int16), affine))),
        ("truncated label", lambda url: save_label(url, "spleen_ct", nifti_bytes(good, affine)[:300])),
        ("text as label", lambda url: save_label(url, "spleen_ct", b"not an image at all")),
        ("empty label", lambda url: save_label(url, "spleen_ct", b"")),
        ("label params not JSON", lambda url: save_label(url, "spleen_ct", nifti_bytes(good, affine), params="{x")),
        (
            "oversized label",
            lambda url: save_label(url, "spleen_ct", os.urandom(UPLOAD_LIMIT_MB * 1024 * 1024 + 10)),
        ),
        (
            "oversized chunked upload",
            lambda url: requests.put(
                f"{url}/datastore/image",
                params={"image": "big"},
                data=(os.urandom(1 << 20) for _ in range(UPLOAD_LIMIT_MB + 2)),
                headers={"Content-Type": "multipart/form-data; boundary=x"},
                timeout=60,
            ),
        ),
        (
            "image id with ../ on upload",
            lambda url: requests.put(
                f"{url}/datastore/image", params={"image": "../evil"}, files={"file": ("x.nii.gz", image)}, timeout=60
            ),
        ),
        (
            "non-image upload",
            lambda url: requests.put(
                f"{url}/datastore/image", params={"image": "junk"}, files={"file": ("junk.nii.gz", b"junk")}, timeout=60
            ),
        ),
        (
            "upload over an existing image",
            lambda url: requests.put(
                f"{url}/datastore/image", params={"image": "spleen_ct"}, files={"file": ("s.nii.gz", image)}, timeout=60
            ),
        ),
        (
            "remove unknown label",
            lambda url: requests.delete(f"{url}/datastore/label", params={"id": "x", "tag": "final"}),
        ),
        (
            "image info not JSON",
            lambda url: requests.put(
                f"{url}/datastore/image/info", params={"image": "spleen_ct"}, files={"info": (None, "nope")}, timeout=30
            ),
        ),
        ("unknown strategy", lambda url: requests.post(f"{url}/activelearning/most_fun", json={}, timeout=30)),
    ]


def test_hostile_input_gets_4xx_and_changes_nothing(guarded):
    before = snapshot(guarded.studies)
    failures = []
    for what, send in hostile_requests():
        r = send(guarded.url)
        if not 400 <= r.status_code < 500 or "detail" not in r.json():
            failures.append(f"{what}: {r.status_code} {r.text[:200]}")
    assert not failures, "\n".join(failures)
    assert snapshot(guarded.studies) == before, "a refused request changed the datastore"
    assert requests.get(f"{guarded.url}/info/", timeout=10).ok


coordinate = st.one_of(
    st.integers(-3, 170), st.integers(-(10**15), 10**15), st.floats(allow_nan=True), st.text(max_size=3)
)
point = st.lists(coordinate, min_size=0, max_size=4)
points = st.one_of(st.lists(point, max_size=3), st.lists(st.just([82, 82, 12]), min_size=1, max_size=2), coordinate)
params_strategy = st.fixed_dictionaries(
    {},
    optional={
        "foreground": points,
        "background": points,
        "roi": st.one_of(st.lists(coordinate, min_size=0, max_size=7), st.just([60, 110, 60, 110, 12, 12])),
        "slice": st.one_of(st.integers(-2, 30), st.text(max_size=3), st.none()),
        "client_id": st.one_of(st.text(max_size=8), st.integers(), st.dictionaries(st.text(max_size=2), st.integers())),
        "reset_state": st.one_of(st.booleans(), st.text(max_size=4)),
        "label": st.one_of(st.text(max_size=6), st.just("spleen")),
        "spleen": points,
        "window": st.one_of(st.sampled_from(["auto", "ct-bone", "percentile", "nope"]), st.integers()),
        "result_extension": st.sampled_from([".nrrd", ".nii.gz", ".exe", "../x"]),
        "result_dtype": st.sampled_from(["uint8", "float32", "complex64"]),
    },
)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(model=st.sampled_from(["medsam_2d", "medsam_deepedit"]), params=params_strategy)
def test_generated_requests_get_4xx_or_a_mask_in_the_image_grid(guarded, model, params):
    r = infer(guarded.url, model, "spleen_ct", params)
    assert r.status_code < 500, r.text
    if r.status_code == 200:
        suffix = params.get("result_extension", ".nrrd")
        assert decoded_mask(r, suffix).shape == SPLEEN_SHAPE
    else:
        assert 400 <= r.status_code < 500 and r.json()["detail"]


def test_labels_survive_resubmission_and_a_killed_server(guarded, tmp_path):
    label, affine = spleen_label()
    first, second = nifti_bytes(label, affine), nifti_bytes(np.zeros_like(label), affine)
    info = json.dumps({"label_info": [{"name": "spleen", "idx": 1}], "client_id": "slicer"})
    assert save_label(guarded.url, "spine_t2w_spinegeneric", first).status_code == 422  # other image's grid
    assert save_label(guarded.url, "spleen_ct", first, params=info).status_code == 200
    assert save_label(guarded.url, "spleen_ct", second, params=info).status_code == 200

    # the server dies without warning; a new one on the same folders has both versions
    os.killpg(guarded.proc.pid, signal.SIGKILL)
    guarded.proc.wait()
    guarded.stop()
    restarted = Server(guarded.studies, guarded.app_dir, tmp_path / "restart.log")
    try:
        r = requests.get(f"{restarted.url}/datastore/label", params={"label": "spleen_ct", "tag": "final"}, timeout=30)
        assert r.status_code == 200
        assert np.array_equal(decoded_mask(r, ".nii.gz"), np.zeros_like(label)), "the latest submission is served"
        history = sorted((guarded.studies / ".label_history" / "final" / "spleen_ct").iterdir())
        assert len(history) == 1 and history[0].read_bytes() == first, "the earlier submission stays recoverable"
        listed = requests.get(f"{restarted.url}/datastore/", params={"output": "all"}, timeout=30).json()
        assert "final" in listed["objects"]["spleen_ct"]["labels"]
        assert not [p for p in guarded.studies.rglob("*.partial")], "no partial file is left behind"
    finally:
        restarted.stop()


def test_eight_annotators_at_once_get_what_they_get_alone(server):
    """8 clients click on different images and slices at the same time: each gets exactly the masks
    it gets alone (no cross-talk of per-client state or cached embeddings), and no request fails."""
    plans = [("spleen_ct" if n < 4 else "abdomen_ct", n) for n in range(8)]

    def session(client: str, image: str, n: int) -> list[np.ndarray]:
        k = 8 + 3 * (n % 4)  # 8 different (image, slice) pairs
        masks = []
        for step, fg in enumerate(([[60, 50, k]], [[60, 50, k], [70, 60, k]])):
            body = {
                "foreground": fg,
                "background": [[10, 10, k]] if step else [],
                "client_id": client,
                "reset_state": step == 0,
            }
            r = infer(server.url, "medsam_2d", image, body)
            assert r.status_code == 200, r.text
            masks.append(decoded_mask(r))
        return masks

    together: dict[int, list[np.ndarray]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(plans))

    def run(n: int, image: str) -> None:
        try:
            barrier.wait()
            together[n] = session(f"annotator-{n}", image, n)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(n, image)) for image, n in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for image, n in plans:
        alone = session(f"alone-{n}", image, n)
        assert all(a.any() for a in alone), f"client {n} on {image}: empty mask"
        same = all(np.array_equal(a, b) for a, b in zip(together[n], alone, strict=True))
        assert same, f"client {n} on {image}: concurrent masks differ from the ones it gets alone"
