# Sourced by the README's commands: makes sure a virtual environment with every dependency exists and
# holds this checkout (editable), then puts it first on PATH. Idempotent and quick once the env exists.
#   TNLLM_VENV   where the env lives (default: ~/.cache/tnllm/venv-<hash of the pins>), shared by clones so
#                that a fresh clone on the same machine reuses it; a change of pins makes a new one.
_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_pins=$(cat "$_root/requirements.txt" "$_root/constraints.txt" | sha256sum | cut -c1-12)
TNLLM_VENV=${TNLLM_VENV:-$HOME/.cache/tnllm/venv-$_pins}
mkdir -p "$(dirname "$TNLLM_VENV")"
exec 9>"$TNLLM_VENV.lock"       # one creator at a time (parallel shells, CI next to a developer)
flock 9
if [ ! -f "$TNLLM_VENV/.complete" ]; then
    echo "[tnllm] creating the environment in $TNLLM_VENV (first time: about 5-10 minutes, fairseq compiles)"
    rm -rf "$TNLLM_VENV"
    python3 -m venv "$TNLLM_VENV" || return 1 2>/dev/null || exit 1
    # torch is pinned by the constraints file: an unpinned torch would download multi-GB CUDA builds
    "$TNLLM_VENV/bin/python" -m pip install --disable-pip-version-check -q \
        -c "$_root/constraints.txt" -r "$_root/requirements.txt" || { echo "[tnllm] install failed" >&2; return 1 2>/dev/null || exit 1; }
    touch "$TNLLM_VENV/.complete"
fi
flock -u 9
# point the editable install at this checkout (several clones may share one env; the one it pointed at
# may since have been deleted, so a failing import only means: install again)
_where=$(cd / && "$TNLLM_VENV/bin/python" -c 'import os, tnllm_plugin, tnllm_kernels; print(os.path.dirname(os.path.dirname(tnllm_plugin.__file__)), os.path.dirname(os.path.dirname(tnllm_kernels.__file__)))' 2>/dev/null || true)
if [ "$_where" != "$_root $_root" ]; then
    "$TNLLM_VENV/bin/python" -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation \
        -c "$_root/constraints.txt" -e "$_root" >/dev/null || { echo "[tnllm] installing the plugin failed" >&2; return 1 2>/dev/null || exit 1; }
fi
export TNLLM_VENV
export PATH="$TNLLM_VENV/bin:$PATH"
exec 9>&-
unset _root _pins _where
