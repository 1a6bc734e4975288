#!/usr/bin/env bash
# The README's test command: sets up the environments if missing, then runs the CPU test suite in two parts:
#   tests/          in the fairseq environment (scripts/ensure_env.sh)
#   tests/metaseq/  in the real Metaseq's environment (scripts/ensure_metaseq.sh; Metaseq's pins conflict with
#                   fairseq's, so it has its own)
# and prints one closing line with the counts of the parts that ran.
#
# Extra arguments go to pytest, each to the part it belongs to:
#   paths (relative to the checkout's root, optionally with ::test ids): one under tests/metaseq goes to the
#     Metaseq part, any other to the fairseq part; a part that gets none while the other does is skipped (each
#     environment collects only its own files: the Metaseq run's spawned workers cannot import tests/conftest.py's
#     objects, and fairseq's environment has no Metaseq). `tests` or `.` stands for both parts.
#   options (-x, -q, -k EXPR, --tb=short, ...): to every part that runs. An option's value given as a separate
#     argument is known for the options in VALUE_OPTIONS below; give any other's as --option=value.
# A part in which they select no test (pytest's exit status 5, e.g. -k matching only fairseq-side tests) does not
# fail the run; the exit status is 5 only when no part selected any.
# e.g. `bash scripts/test.sh -k fixture` (both parts), `bash scripts/test.sh tests/test_convert.py -q` (fairseq only).
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

# pytest's options whose value may come as the next argument (else that value would be taken for a path)
VALUE_OPTIONS=" -k -m -p -c -o -W --tb --maxfail --deselect --ignore --ignore-glob --durations --basetemp --rootdir
    --confcutdir --log-level --junitxml --import-mode "
options=() fairseq_paths=() metaseq_paths=()
while [ $# -gt 0 ]; do
    arg=$1; shift
    case $arg in
        -*) options+=("$arg")
            if [[ $VALUE_OPTIONS == *" $arg "* && $# -gt 0 ]]; then options+=("$1"); shift; fi ;;
        *)  path=${arg#"$root"/}; path=${path%%::*}; path=${path%/}; path=${path#./}
            case $path in
                tests/metaseq | tests/metaseq/*) metaseq_paths+=("$arg") ;;
                tests | . | "$root")             fairseq_paths+=(tests); metaseq_paths+=(tests/metaseq) ;;
                *)                               fairseq_paths+=("$arg") ;;
            esac ;;
    esac
done
# no path at all: the whole suite, both parts
if [ ${#fairseq_paths[@]} -eq 0 ] && [ ${#metaseq_paths[@]} -eq 0 ]; then
    fairseq_paths=(tests) metaseq_paths=(tests/metaseq)
fi

reports=$(mktemp -d)
trap 'rm -rf "$reports"' EXIT
status=0 selected=0
ran=()      # the parts that ran, as name=report, for the summary
run_part() {   # NAME ENV_SCRIPT REPORT PYTEST_ARGS...: one part's pytest run in its own environment (a subshell)
    local name=$1 env=$2 report=$3; shift 3
    (source "$env" && python -m pytest -ra --junitxml="$report" "$@")
    case $? in
        0) selected=1 ;;
        # pytest's "no tests collected": a -k or path that selects nothing in this part fails nothing
        5) echo "scripts/test.sh: the $name part selected no test (pytest's exit status 5); not counted as a failure" ;;
        *) selected=1 status=1 ;;
    esac
    ran+=("$name=$report")
}
if [ ${#fairseq_paths[@]} -gt 0 ]; then
    run_part fairseq scripts/ensure_env.sh "$reports/fairseq.xml" --durations=15 --ignore=tests/metaseq \
        "${fairseq_paths[@]}" "${options[@]}"
else
    echo "scripts/test.sh: fairseq part skipped (no path argument outside tests/metaseq)"
fi
if [ ${#metaseq_paths[@]} -gt 0 ]; then
    run_part Metaseq scripts/ensure_metaseq.sh "$reports/metaseq.xml" --durations=10 \
        "${metaseq_paths[@]}" "${options[@]}"
else
    echo "scripts/test.sh: Metaseq part skipped (no path argument under tests/metaseq)"
fi
python3 - "${ran[@]}" <<'EOF' || status=1
import os
import sys
import xml.etree.ElementTree as ET
counts = dict(tests=0, failures=0, errors=0, skipped=0)
names, missing = [], []
for part in sys.argv[1:]:
    name, path = part.split("=", 1)
    names.append(name)
    if not os.path.isfile(path):        # its environment or pytest stopped before writing one (already a failure)
        missing.append(name)
        continue
    for suite in ET.parse(path).getroot().iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
print(f"parts run: {' and '.join(names)}" + (f" (no report from {', '.join(missing)})" if missing else ""))
print(f"total: {passed} passed, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped")
EOF
# no test selected in any part: pytest's own status for that
[ $status -eq 0 ] && [ $selected -eq 0 ] && status=5
exit $status
