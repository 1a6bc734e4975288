#!/usr/bin/env bash
# The README's test command: sets up the environments if missing, then runs the CPU test suite in two parts:
#   tests/          in the fairseq environment (scripts/ensure_env.sh)
#   tests/metaseq/  in the real Metaseq's environment (scripts/ensure_metaseq.sh; Metaseq's pins conflict with
#                   fairseq's, so it has its own)
# and prints one closing line with the counts of both. Extra arguments go to both pytest runs
# (e.g. `bash scripts/test.sh -k fixture`).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
reports=$(mktemp -d)
trap 'rm -rf "$reports"' EXIT
status=0
(source scripts/ensure_env.sh && python -m pytest -ra --durations=15 --junitxml="$reports/fairseq.xml" \
    --ignore=tests/metaseq tests "$@") || status=1
(source scripts/ensure_metaseq.sh && python -m pytest -ra --durations=10 --junitxml="$reports/metaseq.xml" \
    tests/metaseq "$@") || status=1
python3 - "$reports"/*.xml <<'EOF'
import sys
import xml.etree.ElementTree as ET
counts = dict(tests=0, failures=0, errors=0, skipped=0)
for path in sys.argv[1:]:
    for suite in ET.parse(path).getroot().iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
print(f"both parts (fairseq and Metaseq environments): {len(sys.argv) - 1} reports")
print(f"total: {passed} passed, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped")
EOF
exit $status
