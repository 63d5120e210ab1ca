"""A real ``monailabel start_server`` process on a free loopback port (tests and benchmarks)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group started with ``start_new_session``; SIGKILL it after 20 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class Server:
    """``monailabel start_server`` in its own process group on a free loopback port."""

    def __init__(
        self,
        studies: Path,
        app_dir: Path,
        log: Path,
        conf: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        ready_status: int = 200,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.studies, self.app_dir, self.log = studies, app_dir, log
        cmd = [
            sys.executable,
            "-m",
            "monailabel.main",
            "start_server",
            "--app",
            str(app_dir),
            "--studies",
            str(studies),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--uvicorn_app",
            "lib.server:app",  # as scripts/serve.sh: MONAI Label's app behind the request guard
        ]
        for key, value in (conf or {}).items():
            cmd += ["--conf", key, value]
        path = os.pathsep.join(p for p in (str(app_dir), os.environ.get("PYTHONPATH", "")) if p)
        # the environment's bin first, as scripts/serve.sh does: dcmqi's itkimage2segimage lives there
        bin_path = os.pathsep.join((str(Path(sys.executable).parent), os.environ.get("PATH", "")))
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path, PATH=bin_path, **(env or {}))
        self._log_fh = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, stdout=self._log_fh, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{log.read_text()[-4000:]}")
            try:
                if requests.get(f"{self.url}/info/", timeout=2).status_code == ready_status:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server did not start in time:\n{log.read_text()[-4000:]}")

    def stop(self) -> None:
        stop_process_group(self.proc)
        self._log_fh.close()


ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class Orthanc:
    """Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``) with its DICOMweb plugin, storage in
    ``workdir``, HTTP on a loopback port; remote access and the DICOM port are off."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        if not ORTHANC.is_file() or not DICOMWEB_PLUGIN.is_file():
            raise FileNotFoundError("Orthanc is not installed: apt-get install -y orthanc orthanc-dicomweb")
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.url}/dicom-web"
        storage = workdir / "orthanc-db"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "medsam-adapter",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "HttpPort": self.port,
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "WadoRoot": "/wado",
                "Host": f"127.0.0.1:{self.port}",
                "Ssl": False,
            },
        }
        (workdir / "orthanc.json").write_text(json.dumps(config, indent=1))
        self._log_fh = open(workdir / "orthanc.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(ORTHANC), str(workdir / "orthanc.json")],
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited early:\n{(workdir / 'orthanc.log').read_text()[-3000:]}")
            try:
                if requests.get(f"{self.url}/system", timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError("Orthanc did not start in time")

    def upload(self, folder: Path) -> int:
        """Store every DICOM file under ``folder`` (``POST /instances``); returns how many."""
        count = 0
        for path in sorted(folder.rglob("*.dcm")):
            r = requests.post(f"{self.url}/instances", data=path.read_bytes(), timeout=60)
            r.raise_for_status()
            count += 1
        return count

    def series(self, modality: str | None = None) -> list[dict]:
        """QIDO-RS series records (optionally of one modality)."""
        query = {"Modality": modality} if modality else {}
        r = requests.get(f"{self.dicomweb}/series", params=query, timeout=30)
        r.raise_for_status()
        return r.json() if r.content else []

    def stop(self) -> None:
        stop_process_group(self.proc)
        self._log_fh.close()
