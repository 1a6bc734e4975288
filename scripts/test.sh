#!/usr/bin/env bash
# The README's test command: sets up the environment if missing, then runs the CPU test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k fixture`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure_env.sh
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
python -m pytest -ra --durations=15 tests "$@"
