#!/usr/bin/env bash
# The main job through the real Metaseq: set up its environment if missing (scripts/ensure_metaseq.sh), then run
# examples/metaseq_quickstart.py (see its --help): corpus, BPE, metaseq-train, metaseq-validate, generation.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure_metaseq.sh
export PYTHONUNBUFFERED=1
exec python examples/metaseq_quickstart.py "$@"
