#!/usr/bin/env bash
# Start the app on the shipped sample data at http://127.0.0.1:8000 (creates .venv first if missing).
# Extra arguments go to `monailabel start_server`, e.g. --conf models lite_medsam --port 8001.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup_venv.sh
# the monailabel launcher runs the first `python` on PATH: put the project's environment first
export PATH="$root/.venv/bin:$PATH"
# lib.server is MONAI Label's own server app behind a request guard (upload limit, 4xx for bad JSON)
export PYTHONPATH="$root/apps/medsam_adapter${PYTHONPATH:+:$PYTHONPATH}"
exec monailabel start_server --app apps/medsam_adapter --studies sample-data --host 127.0.0.1 --port 8000 \
  --uvicorn_app lib.server:app "$@"
