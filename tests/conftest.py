"""Shared fixtures: the app's code on sys.path, real data paths, a real MONAI Label server."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "apps" / "medsam_adapter"
SAMPLE = ROOT / "sample-data"
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(APP))


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``monailabel start_server`` in its own process group on a free loopback port."""

    def __init__(self, studies: Path, app_dir: Path, log: Path, conf: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.studies, self.app_dir, self.log = studies, app_dir, log
        cmd = [
            sys.executable, "-m", "monailabel.main", "start_server",
            "--app", str(app_dir), "--studies", str(studies), "--host", "127.0.0.1", "--port", str(self.port),
        ]
        for key, value in (conf or {}).items():
            cmd += ["--conf", key, value]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._log_fh = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log_fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{log.read_text()[-4000:]}")
            try:
                if requests.get(f"{self.url}/info/", timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server did not start in time:\n{log.read_text()[-4000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log_fh.close()


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
