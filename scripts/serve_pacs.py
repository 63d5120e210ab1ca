"""The whole stack on one machine: Orthanc (DICOMweb PACS) on loopback with the shipped DICOM series,
and the app on port 8000 serving them (OHIF at http://127.0.0.1:8000/ohif/).

    ./scripts/serve_pacs.sh [--orthanc-port 8042] [--port 8000] [--data .pacs] [extra start_server args]

Orthanc keeps its database in ``--data`` (so DICOM-SEG labels saved from OHIF or Slicer stay); the
shipped series in ``sample-data/dicom`` are loaded when it is empty. Ctrl-C stops both.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from live_server import Orthanc  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--orthanc-port", type=int, default=8042)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--data", type=Path, default=ROOT / ".pacs")
    args, extra = ap.parse_known_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop both on a plain kill too

    orthanc = Orthanc(args.data.resolve(), port=args.orthanc_port)
    try:
        if not orthanc.series():
            count = orthanc.upload(ROOT / "sample-data" / "dicom")
            print(f"Orthanc: loaded {count} DICOM files from sample-data/dicom", flush=True)
        print(f"Orthanc DICOMweb at {orthanc.dicomweb} (loopback only)", flush=True)
        cmd = [
            sys.executable, "-m", "monailabel.main", "start_server",
            "--app", str(ROOT / "apps" / "medsam_adapter"),
            "--studies", orthanc.dicomweb,
            "--host", "127.0.0.1", "--port", str(args.port),
            "--uvicorn_app", "lib.server:app",
            *extra,
        ]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=str(ROOT / "apps" / "medsam_adapter"))
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        server = subprocess.Popen(cmd, env=env)
        try:
            return server.wait()
        finally:
            if server.poll() is None:
                server.terminate()
                server.wait(timeout=30)
    except KeyboardInterrupt:
        return 0
    finally:
        orthanc.stop()


if __name__ == "__main__":
    raise SystemExit(main())
