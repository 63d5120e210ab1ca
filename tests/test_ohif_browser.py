"""OHIF in a real browser: Debian's Chromium, driven by playwright-core, against the real server on a
real Orthanc. The annotator's path: open the study in OHIF's MONAI Label mode, connect the panel,
pick "spleen", click on the image, Run the 2D task and then the 3D task.

Checks: the server answered each run with a raw NRRD label in the series' grid (one slice for 2D,
several for 3D), and OHIF drew it (pixels of the viewports took the segment's tint). Screenshots are
kept in ``test-artifacts/ohif/``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from live_server import ORTHANC, Orthanc
from PIL import Image

from conftest import APP, DICOM, ROOT, Server, series_geometry, series_uid

BROWSER = ROOT / "tests" / "browser"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts" / "ohif"

pytestmark = pytest.mark.skipif(
    not (ORTHANC.is_file() and shutil.which("node") and shutil.which(CHROMIUM)),
    reason="needs Orthanc, Node.js and Chromium (apt-get install -y orthanc orthanc-dicomweb chromium nodejs "
    "npm; .ci/run does)",
)


def tinted_pixels(before: Image.Image, after: Image.Image) -> int:
    """Pixels that took a purple segment tint (red and blue up against green) between two screenshots."""

    def tint(img: Image.Image) -> np.ndarray:
        a = np.asarray(img.convert("RGB")).astype(int)
        return np.minimum(a[..., 0] - a[..., 1], a[..., 2] - a[..., 1])

    return int(((tint(after) - tint(before)) > 15).sum())


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if not (BROWSER / "node_modules" / "playwright-core").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=BROWSER, check=True, timeout=600)
    base = tmp_path_factory.mktemp("ohif")
    orthanc = Orthanc(base)
    try:
        orthanc.upload(DICOM / "ct_spleen_converted")
        app_dir = base / "app"
        shutil.copytree(APP, app_dir, ignore=shutil.ignore_patterns("model", "__pycache__", "logs"))
        server = Server(orthanc.dicomweb, app_dir, base / "server.log")
        yield server
        server.stop()
    finally:
        orthanc.stop()


def test_point_prompts_in_ohif_draw_the_server_labels(stack):
    folder = DICOM / "ct_spleen_converted"
    study = str(pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    run = subprocess.run(
        ["node", "ohif_point_prompts.mjs", stack.url, study, str(ARTIFACTS)],
        cwd=BROWSER,
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, CHROMIUM=CHROMIUM),
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = {r["task"]: r for r in (json.loads(line) for line in run.stdout.splitlines() if line.startswith("{"))}
    assert set(results) == {"medsam_2d", "medsam_3d"}, run.stdout[-3000:]
    shape, _ = series_geometry(folder)
    clicked = None
    for task, result in results.items():
        assert result["status"] == 200, result
        assert f"image={series_uid(folder)}" in result["url"], "OHIF names the series by its SeriesInstanceUID"
        params = json.loads(result["request"].split("\r\n\r\n", 1)[1].split("\r\n--", 1)[0])
        assert params["result_extension"] == ".nrrd" and params["result_compress"] is False  # OHIF's request
        assert result["encoding"] == "raw" and tuple(result["sizes"]) == shape, result
        assert result["nonzero"] > 0, f"{task}: empty label"
        clicked = params["foreground"][0][2]
    assert results["medsam_2d"]["slices"] == [clicked], "2D: the label must be on the clicked slice only"
    assert len(results["medsam_3d"]["slices"]) > 3 and clicked in results["medsam_3d"]["slices"], "3D did not propagate"

    def drawn(task: str, viewport: int) -> int:
        return tinted_pixels(
            Image.open(ARTIFACTS / f"{task}_before_{viewport}.png"),
            Image.open(ARTIFACTS / f"{task}_after_{viewport}.png"),
        )

    assert drawn("medsam_2d", 0) > 100, "OHIF drew no 2D overlay on the axial view"
    assert drawn("medsam_3d", 1) > 3 * drawn("medsam_2d", 1), "the 3D overlay is not taller than the 2D one"
