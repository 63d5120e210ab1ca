"""Shared fixtures: the app's code on sys.path, real data paths, a real MONAI Label server."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "apps" / "medsam_adapter"
SAMPLE = ROOT / "sample-data"
SHARED = ROOT.parent / "shared" / "data"
DICOM = SAMPLE / "dicom"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
sys.path.insert(0, str(APP))

from live_server import Server  # noqa: E402


def shared(*parts: str) -> Path:
    """A file of ../shared/data; the test is skipped when that folder is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not available (../shared/data is only present on project machines)")
    return path


@pytest.fixture(scope="session")
def lite_model():
    import torch

    from lib.core.backbones import build_backbone
    from lib.core.config import AdapterSettings
    from lib.core.model import AdaptedSam

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    return AdaptedSam(build_backbone("lite_medsam"), AdapterSettings(), labels=("spleen",))


@pytest.fixture(scope="module")
def spleen_slice():
    """Slice 12 of the sample spleen CT (display orientation), its spleen label, the view and the window."""
    from lib.core.config import PreprocessSettings
    from lib.core.orientation import SliceView
    from lib.core.preprocess import choose_window
    from lib.core.volume import load_volume

    image = load_volume(SAMPLE / "spleen_ct.nii.gz")
    label = load_volume(SAMPLE / "reference" / "spleen_ct.nii.gz")
    view = SliceView.from_affine(image.affine, 2)
    k = 12
    return view.slice(image.array, k), view.slice(label.array, k) > 0, view, choose_window(image.array,
                                                                                           PreprocessSettings())


def series_uid(folder: Path) -> str:
    return str(pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID)


def series_geometry(folder: Path) -> tuple[tuple[int, int, int], np.ndarray]:
    """(columns, rows, slices) and the voxel-to-RAS affine of a DICOM series, from its headers:
    i along a row (increasing column), j down the rows, k along the normal in position order."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in folder.glob("*.dcm")]
    iop = np.asarray(headers[0].ImageOrientationPatient, dtype=float)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    headers.sort(key=lambda h: float(np.dot(normal, np.asarray(h.ImagePositionPatient, dtype=float))))
    positions = np.array([np.asarray(h.ImagePositionPatient, dtype=float) for h in headers])
    step = positions[1] - positions[0] if len(positions) > 1 else normal * float(headers[0].SliceThickness)
    dr, dc = (float(v) for v in headers[0].PixelSpacing)  # between rows, between columns
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_dir * dc, col_dir * dr, step, positions[0]
    return (int(headers[0].Columns), int(headers[0].Rows), len(headers)), LPS_TO_RAS @ lps


def studies_copy(dest: Path) -> Path:
    """The shipped sample images (without reference labels) in a fresh datastore folder."""
    dest.mkdir(parents=True)
    for f in SAMPLE.glob("*.nii.gz"):
        shutil.copy(f, dest / f.name)
    return dest


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("server")
    app_dir = base / "app"
    shutil.copytree(APP, app_dir, ignore=shutil.ignore_patterns("model", "__pycache__", "logs"))
    srv = Server(studies_copy(base / "studies"), app_dir, base / "server.log")
    yield srv
    srv.stop()
