"""Shared fixtures: the app's code on sys.path, real data paths, a real MONAI Label server."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "apps" / "medsam_adapter"
SAMPLE = ROOT / "sample-data"
SHARED = ROOT.parent / "shared" / "data"
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
