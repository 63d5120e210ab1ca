#!/usr/bin/env bash
# Orthanc (DICOMweb) with the shipped DICOM series + the app on http://127.0.0.1:8000 (OHIF at /ohif/).
# Needs Debian's Orthanc: sudo apt-get install -y orthanc orthanc-dicomweb. Extra arguments go to
# scripts/serve_pacs.py (see --help) and from there to `monailabel start_server`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup_venv.sh
exec .venv/bin/python scripts/serve_pacs.py "$@"
