#!/usr/bin/env bash
# Run the test suite (creates .venv first if missing). Extra arguments go to pytest.
# Tests that need ../shared/data run when that folder exists and are skipped otherwise.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup_venv.sh
.venv/bin/ruff check apps tests benchmarks scripts
exec .venv/bin/python -m pytest -q tests "$@"
