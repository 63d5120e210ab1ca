"""Active learning over HTTP: submit labels as Slicer does, train with Slicer's and OHIF's requests,
see the new adapters served without a restart, and pick the next image by the model's uncertainty."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time

import nibabel as nib
import numpy as np
import pytest
import requests
from monailabel.client import MONAILabelClient

from conftest import APP, SAMPLE, Server, studies_copy

LABELLED = ("spleen_ct", "abdomen_ct", "abdomen_mr")


@pytest.fixture(scope="module")
def train_server(tmp_path_factory):
    base = tmp_path_factory.mktemp("train_server")
    app_dir = base / "app"
    shutil.copytree(APP, app_dir, ignore=shutil.ignore_patterns("model", "__pycache__", "logs"))
    # server-side defaults for requests that leave options out (OHIF's "Update Model" sends {})
    conf = {"train_max_epochs": "2", "train_max_slices_per_volume": "4"}
    server = Server(studies_copy(base / "studies"), app_dir, base / "server.log", conf)
    yield server
    server.stop()


def spleen_only(name: str, folder) -> str:
    """The reference label of ``name`` reduced to the spleen (value 1), as an annotator would save it."""
    img = nib.load(str(SAMPLE / "reference" / f"{name}.nii.gz"))
    data = (np.asarray(img.dataobj) == 1).astype(np.uint8)
    path = folder / f"{name}_spleen.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(path))
    return str(path)


def wait_for(url: str, kind: str, timeout: float = 900) -> dict:
    """Wait until no ``kind`` (train, scoring) task runs and the latest one has a final status."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        running = requests.get(f"{url}/{kind}/", params={"check_if_running": True}, timeout=10).status_code == 200
        latest = requests.get(f"{url}/{kind}/", timeout=10)
        if latest.status_code == 404 and not running:
            return {}
        if not running and latest.json().get("status") in ("DONE", "ERROR", "STOPPED"):
            return latest.json()
        time.sleep(2)
    raise AssertionError(f"{kind} did not finish in time")


def wait_for_training(url: str) -> dict:
    return wait_for(url, "train")


def probe_clicks() -> list[list[int]]:
    """Two clicks inside the spleen on slice 12: its most interior point, then one halfway to its edge."""
    from lib.core.annotator import interior_point

    gt = nib.load(str(SAMPLE / "reference" / "spleen_ct.nii.gz")).get_fdata()[:, :, 12] > 0
    i, j = interior_point(gt)
    edge = np.argwhere(gt)[0]
    return [[i, j, 12], [int((i + edge[0]) // 2), int((j + edge[1]) // 2), 12]]


def infer_click(url: str) -> dict:
    body = {"foreground": probe_clicks(), "slice": 12, "client_id": "probe", "reset_state": True}
    r = requests.post(
        f"{url}/infer/medsam_2d",
        params={"image": "spleen_ct", "output": "json"},
        files={"params": (None, json.dumps(body))},
        timeout=120,
    )
    r.raise_for_status()
    return r.json()


def infer_mask(client: MONAILabelClient) -> np.ndarray:
    path, _ = client.infer(
        "medsam_2d",
        "spleen_ct",
        {"foreground": probe_clicks(), "slice": 12, "result_extension": ".nii.gz", "reset_state": True},
    )
    return np.asarray(nib.load(path).dataobj)


def test_labels_train_publish_and_hot_reload(train_server):
    url = train_server.url
    client = MONAILabelClient(url, tmpdir=tempfile.mkdtemp(), client_id="slicer-annotator")
    base_mask = infer_mask(client)
    assert infer_click(url)["model_version"] == "shipped"  # the shipped click adapter serves first

    work = train_server.log.parent
    for name in LABELLED:
        label = str(SAMPLE / "reference" / "spleen_ct.nii.gz") if name == "spleen_ct" else spleen_only(name, work)
        client.save_label(name, label, params={"label_info": [{"name": "spleen", "idx": 1}], "client_id": "slicer"})
    assert sorted(requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=10).json()["objects"])

    # Slicer's Train button: POST /train/{model} with its trainer options, tracking "mlflow" included
    slicer_options = {
        "max_epochs": 2,
        "learning_rate": 0.0001,
        "val_split": 0.2,
        "max_slices_per_volume": 4,
        "train_encoder_adapters": False,
        "train_prompt_free_head": True,
        "publish": "always",  # the shipped adapter is already good at spleen: publish this short round anyway
        "seed": 0,
        "tracking": "mlflow",
        "tracking_uri": "",
        "tracking_experiment_name": "",
        "client_id": "slicer",
    }
    client.train_start("medsam", slicer_options)
    task = wait_for_training(url)
    assert task["status"] == "DONE", task
    stats = requests.get(f"{url}/info/", timeout=10).json()["train_stats"]["medsam"]
    assert stats["status"] == "DONE" and stats["total_epochs"] == 2 and stats["epoch"] >= 1
    assert "best_metric" in stats and "validation on 1 of 3" in stats["validation"]
    assert stats["trainable_parameters"] < 0.2 * stats["total_parameters"]
    assert stats["before"]["objects"] > 0 and "click3_dice" in stats["after"]
    assert stats["started_from"] == "shipped", "a round continues from the served (shipped) adapters"
    published = stats["published_version"]
    assert published == 1, stats["notes"]

    # hot reload: the next request is answered by the new adapters, and the mask changes
    answer = infer_click(url)
    assert answer["model_version"] == f"v{published}"
    # the round trained decoder-side parts only (the CPU default): the encoder is unchanged, so the
    # slice's embedding from before the round stays valid and is reused
    assert answer["embedding_cached"]
    assert not np.array_equal(infer_mask(client), base_mask)

    # the prompt-free head was trained on the "spleen" labels: the automatic task now answers
    auto, _ = client.infer("medsam_auto", "spleen_ct", {"result_extension": ".nii.gz"})
    auto_label = np.asarray(nib.load(auto).dataobj)
    assert auto_label.shape == (164, 166, 26) and set(np.unique(auto_label).tolist()) <= set(range(8))

    # OHIF's "Update Model": POST /train/ with {} (server defaults apply)
    r = requests.post(f"{url}/train/", json={}, timeout=30)
    assert r.status_code == 200, r.text
    time.sleep(1)
    task = wait_for_training(url)
    assert task["status"] == "DONE", task
    stats = requests.get(f"{url}/info/", timeout=10).json()["train_stats"]["medsam"]
    assert stats["status"] == "DONE" and stats["started_from"] == f"v{published}"
    adapters = sorted((train_server.app_dir / "model" / "lite_medsam" / "adapters").glob("adapter_v*.pt"))
    assert len(adapters) == 1 + (stats["published_version"] is not None), "earlier versions must be kept"


def test_uncertainty_strategy_picks_an_unlabelled_image(train_server):
    url = train_server.url
    wait_for(url, "scoring")  # the refresh MONAI Label starts after each training round
    r = requests.post(f"{url}/scoring/uncertainty", params={"run_sync": True}, json={}, timeout=600)
    assert r.status_code == 200, r.text
    scored = r.json()["scored"]
    assert scored and not set(scored) & set(LABELLED)
    pick = requests.post(f"{url}/activelearning/uncertainty", json={"client_id": "slicer"}, timeout=60)
    assert pick.status_code == 200, pick.text
    chosen = pick.json()["id"]
    assert chosen not in LABELLED
    assert chosen == max(scored, key=lambda k: scored[k]["score"])
    first = requests.post(f"{url}/activelearning/first", json={}, timeout=60).json()["id"]
    assert first not in LABELLED
    unknown = requests.post(f"{url}/activelearning/most_fun", json={}, timeout=60)
    assert unknown.status_code == 404 and "unknown strategy" in unknown.json()["detail"]


def test_inference_keeps_answering_through_a_round_and_its_publishing(train_server):
    """An annotator keeps clicking while a round trains and publishes: no request fails, and the
    answers move from the old adapter version to the new one once, never back."""
    url = train_server.url
    wait_for(url, "scoring")
    before = infer_click(url)["model_version"]
    answers: list[tuple[int, str]] = []
    stop = threading.Event()

    def annotator() -> None:
        while not stop.is_set():
            try:
                answers.append((200, infer_click(url)["model_version"]))
            except Exception as e:  # noqa: BLE001 - every failure is counted
                answers.append((0, repr(e)))

    clicking = threading.Thread(target=annotator)
    clicking.start()
    try:
        options = {"max_epochs": 1, "max_slices_per_volume": 2, "publish": "always"}
        assert requests.post(f"{url}/train/medsam", json=options, timeout=60).status_code == 200
        time.sleep(1)
        task = wait_for_training(url)
        assert task["status"] == "DONE", task
        published = requests.get(f"{url}/info/", timeout=10).json()["train_stats"]["medsam"]["published_version"]
        deadline = time.time() + 60
        while time.time() < deadline and (not answers or answers[-1][1] != f"v{published}"):
            time.sleep(0.5)
    finally:
        stop.set()
        clicking.join()
    failures = [a for a in answers if a[0] != 200]
    assert not failures, failures[:3]
    versions = [v for _, v in answers]
    assert len(versions) >= 3 and set(versions) <= {before, f"v{published}"}, versions
    switch = versions.index(f"v{published}")
    assert all(v == f"v{published}" for v in versions[switch:]), f"answers went back to an older version: {versions}"


def test_automatic_round_after_n_saved_labels(tmp_path_factory):
    base = tmp_path_factory.mktemp("auto_round")
    app_dir = base / "app"
    shutil.copytree(APP, app_dir, ignore=shutil.ignore_patterns("model", "__pycache__", "logs"))
    conf = {"auto_train_after": "2", "train_max_epochs": "1", "train_max_slices_per_volume": "2"}
    server = Server(studies_copy(base / "studies"), app_dir, base / "server.log", conf)
    try:
        client = MONAILabelClient(server.url, tmpdir=tempfile.mkdtemp(), client_id="annotator")
        info = {"label_info": [{"name": "spleen", "idx": 1}]}
        client.save_label("spleen_ct", str(SAMPLE / "reference" / "spleen_ct.nii.gz"), params=info)
        time.sleep(2)
        assert requests.get(f"{server.url}/train/", timeout=10).status_code == 404, "one label must not start a round"
        client.save_label("abdomen_ct", spleen_only("abdomen_ct", base), params=info)
        deadline = time.time() + 60
        while requests.get(f"{server.url}/train/", timeout=10).status_code == 404 and time.time() < deadline:
            time.sleep(1)
        task = wait_for_training(server.url)
        assert task["status"] == "DONE", task
        stats = requests.get(f"{server.url}/info/", timeout=10).json()["train_stats"]["medsam"]
        assert stats["status"] == "DONE" and stats["total_epochs"] == 1
    finally:
        server.stop()
