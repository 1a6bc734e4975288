#!/usr/bin/env bash
# The README's main job: set up the environment if missing, then run examples/quickstart.py (see its --help).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure_env.sh
export PYTHONUNBUFFERED=1
exec python examples/quickstart.py "$@"
