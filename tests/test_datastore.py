"""The datastore shared by the server and the subprocesses MONAI Label starts (scoring, training):
each holds its own copy of ``datastore_v2.json``, and no process's write may drop another's change."""

from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fastapi import HTTPException

from lib.datastore import GuardedDatastore

SPLEEN = [{"name": "spleen", "idx": 1}]


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    studies = tmp_path / "studies"
    studies.mkdir()
    for name in ("a", "b"):
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), np.eye(4)), studies / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((8, 8, 4), np.uint8), np.eye(4)), tmp_path / "label.nii.gz")
    return studies


def stored(folder: Path) -> dict:
    return json.loads((folder / "datastore_v2.json").read_text())["objects"]


def test_a_scoring_process_started_before_a_label_was_saved_keeps_that_label(folder):
    """The failure CI caught: MONAI Label's scoring subprocess loaded the datastore at start, the
    server saved a label, then the subprocess stored its scores and wrote the file without the label."""
    server = GuardedDatastore(str(folder), max_upload_mb=10)
    scorer = GuardedDatastore(str(folder), max_upload_mb=10)  # another process's copy, loaded now
    label = folder.parent / "label.nii.gz"
    server.save_label("a", str(label), "final", {"label_info": SPLEEN})
    scorer.update_image_info("a", {"score": 0.5})
    scorer.update_image_info("b", {"score": 0.7})
    server.save_label("b", str(label), "final", {"label_info": SPLEEN})

    objects = stored(folder)
    for image in ("a", "b"):
        assert objects[image]["labels"]["final"]["info"]["label_info"] == SPLEEN, objects[image]
    assert objects["a"]["image"]["info"]["score"] == 0.5 and objects["b"]["image"]["info"]["score"] == 0.7
    fresh = GuardedDatastore(str(folder), max_upload_mb=10)
    assert sorted(fresh.get_labeled_images()) == ["a", "b"]


def test_removals_from_another_process_are_seen_and_archived(folder):
    server = GuardedDatastore(str(folder), max_upload_mb=10)
    other = GuardedDatastore(str(folder), max_upload_mb=10)
    label = folder.parent / "label.nii.gz"
    server.save_label("a", str(label), "final", {"label_info": SPLEEN})
    other.remove_label("a", "final")  # loads the saved label first, then removes it
    assert "final" not in stored(folder)["a"]["labels"]
    assert not (folder / "labels" / "final" / "a.nii.gz").exists()
    assert len(other.label_history("a", "final")) == 1, "a removed label is kept in the history"
    with pytest.raises(HTTPException) as gone:
        server.remove_label("a", "final")  # the server's copy still lists it: the file decides
    assert gone.value.status_code == 404
    server.remove_image("b")
    assert "b" not in stored(folder) and not (folder / "b.nii.gz").exists()
    other.update_image_info("a", {"seen": True})  # its copy still held "b": reloaded before writing
    assert "b" not in stored(folder) and stored(folder)["a"]["image"]["info"]["seen"] is True


def test_a_watching_server_sees_another_process_s_atomic_write(folder):
    """With auto reload (the server's default), a file replaced by another process (atomic writes
    arrive as moves, not modifications) is loaded without waiting for the server's next change."""
    server = GuardedDatastore(str(folder), max_upload_mb=10, auto_reload=True)
    scorer = GuardedDatastore(str(folder), max_upload_mb=10)
    scorer.update_image_info("a", {"score": 0.25})
    deadline = time.time() + 10
    while server.get_image_info("a").get("score") != 0.25 and time.time() < deadline:
        time.sleep(0.1)
    assert server.get_image_info("a").get("score") == 0.25
