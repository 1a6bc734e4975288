# Sourced: makes sure a virtual environment with the real Metaseq (commit f7ffa5f, patched by
# scripts/metaseq.patch) and this checkout exists, then puts it first on PATH, so that metaseq-train,
# metaseq-validate and metaseq-api-local run with --user-dir tnllm_plugin. Idempotent; quick once it exists.
#
#   source scripts/ensure_metaseq.sh
#
# Metaseq is not on PyPI. Its source comes from, in this order:
#   $TNLLM_METASEQ_SOURCE                                a tar.gz of the source, or a directory holding it
#   <shared>/vendor/metaseq-<commit>.tar.gz               <shared> = $TNLLM_SHARED_DIR, else ../shared
#   GitHub, facebookresearch/metaseq at <commit>          (needs network)
# Metaseq's pins (omegaconf 2.1, hydra 1.1) do not install on Python >= 3.11 and conflict with fairseq's, so it
# gets its own environment, separate from scripts/ensure_env.sh's:
#   TNLLM_METASEQ_VENV   where (default ~/.cache/tnllm/metaseq-<hash of the pins, the patch and this script>)
#   TNLLM_METASEQ_SYSTEM_TORCH=1   use the interpreter's own torch (a GPU machine's CUDA build) and whatever
#                                  of scripts/metaseq_requirements.txt it already has, instead of the CPU torch
#                                  pinned in constraints.txt; only what it lacks is installed, at our pins
# Extra pip options (PIP_NO_INDEX, PIP_FIND_LINKS for a machine without network) pass through pip's own
# environment variables.
_ms_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_ms_commit=f7ffa5fd61cf90f498a36d365c13dd7f1a912ff7
_ms_hash=$(cat "$_ms_root/scripts/metaseq_requirements.txt" "$_ms_root/scripts/metaseq.patch" \
    "$_ms_root/scripts/ensure_metaseq.sh" "$_ms_root/constraints.txt" | sha256sum | cut -c1-12)
TNLLM_METASEQ_VENV=${TNLLM_METASEQ_VENV:-$HOME/.cache/tnllm/metaseq-$_ms_hash${TNLLM_METASEQ_SYSTEM_TORCH:+-system}}

_ms_fail() { echo "[tnllm] ensure_metaseq: $*" >&2; return 1; }

_ms_source() {   # prints the path of a tar.gz of Metaseq's source at $_ms_commit
    local shared=${TNLLM_SHARED_DIR:-$_ms_root/../shared} src=${TNLLM_METASEQ_SOURCE:-}
    if [ -n "$src" ]; then
        [ -d "$src" ] && src="$src/metaseq-$_ms_commit.tar.gz"
        [ -f "$src" ] || { _ms_fail "TNLLM_METASEQ_SOURCE=$TNLLM_METASEQ_SOURCE: no such archive"; return 1; }
        echo "$src"
    elif [ -f "$shared/vendor/metaseq-$_ms_commit.tar.gz" ]; then
        echo "$shared/vendor/metaseq-$_ms_commit.tar.gz"
    else
        local dl="$TNLLM_METASEQ_VENV.src.tar.gz"
        echo "[tnllm] no vendored archive in $shared/vendor: downloading Metaseq $_ms_commit from GitHub" >&2
        python3 -c "import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])" \
            "https://github.com/facebookresearch/metaseq/archive/$_ms_commit.tar.gz" "$dl" \
            || { _ms_fail "could not download Metaseq (no network?): set TNLLM_METASEQ_SOURCE to its archive"; return 1; }
        echo "$dl"
    fi
}

_ms_build() {
    local py=$TNLLM_METASEQ_VENV/bin/python archive build pip_q=(--disable-pip-version-check -q)
    archive=$(_ms_source) || return 1
    echo "[tnllm] creating the Metaseq environment in $TNLLM_METASEQ_VENV from $archive (first time: a few minutes)"
    rm -rf "$TNLLM_METASEQ_VENV"
    if [ -n "${TNLLM_METASEQ_SYSTEM_TORCH:-}" ]; then
        python3 -c "import torch" 2>/dev/null || { _ms_fail "TNLLM_METASEQ_SYSTEM_TORCH is set but python3 has no torch"; return 1; }
        python3 -m venv "$TNLLM_METASEQ_VENV" || return 1
        # the interpreter's own packages behind the environment's, by a .pth file rather than
        # --system-site-packages: that flag reaches the base interpreter's, not those of a python3 that is a
        # virtual environment itself (the GPU image's is)
        python3 -c 'import site; print("\n".join(site.getsitepackages()))' \
            > "$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_tnllm_system_site.pth"
    else
        python3 -m venv "$TNLLM_METASEQ_VENV" || return 1
        "$py" -m pip install "${pip_q[@]}" -c "$_ms_root/constraints.txt" torch || { _ms_fail "installing torch failed"; return 1; }
    fi
    local reqs="$_ms_root/scripts/metaseq_requirements.txt"
    if [ -n "${TNLLM_METASEQ_SYSTEM_TORCH:-}" ]; then
        # a prepared image (the GPU machine's) has most of these at other versions, built against its own
        # numpy and torch: keep those, and install at our pins only what it lacks
        reqs="$TNLLM_METASEQ_VENV.missing.txt"
        "$py" - "$_ms_root/scripts/metaseq_requirements.txt" > "$reqs" <<'EOF_PY' || return 1
import importlib.metadata as md, re, sys
for line in open(sys.argv[1]):
    req = line.split("#")[0].strip()
    if req:
        try:
            md.version(re.split(r"[=<>~! ]", req)[0])
        except md.PackageNotFoundError:
            print(req)
EOF_PY
    fi
    "$py" -m pip install "${pip_q[@]}" -r "$reqs" || { _ms_fail "installing Metaseq's dependencies failed"; return 1; }
    build=$(mktemp -d)
    tar xzf "$archive" -C "$build" || { _ms_fail "$archive is not a readable tar.gz"; return 1; }
    local src
    src=$(find "$build" -mindepth 1 -maxdepth 1 -type d | head -n 1)
    [ -f "$src/metaseq/dataclass/configs.py" ] || { _ms_fail "$archive does not hold Metaseq's source"; return 1; }
    (cd "$src" && patch -p1 --forward --quiet < "$_ms_root/scripts/metaseq.patch") \
        || { _ms_fail "scripts/metaseq.patch does not apply to $archive (not commit $_ms_commit?)"; return 1; }
    # without Metaseq's apex and Megatron CUDA extensions (the plugin uses neither; they need nvcc); its two
    # Cython data helpers are built
    (cd "$src" && "$py" setup.py -q --no_megatron --no_apex bdist_wheel -d "$build/dist" >"$build/build.log" 2>&1) \
        || { tail -n 30 "$build/build.log" >&2; _ms_fail "building Metaseq failed (log above)"; return 1; }
    "$py" -m pip install "${pip_q[@]}" --no-deps "$build"/dist/metaseq-*.whl || { _ms_fail "installing Metaseq failed"; return 1; }
    rm -rf "$build"
    echo "$_ms_hash" > "$TNLLM_METASEQ_VENV/.complete"
}

mkdir -p "$(dirname "$TNLLM_METASEQ_VENV")"
exec 8>"$TNLLM_METASEQ_VENV.lock"      # one creator at a time
flock 8
_ms_ok=1
# the hash of what went into it, so that an environment named by TNLLM_METASEQ_VENV is rebuilt when they change
if [ "$(cat "$TNLLM_METASEQ_VENV/.complete" 2>/dev/null)" != "$_ms_hash" ]; then
    _ms_build || _ms_ok=
fi
flock -u 8
exec 8>&-
if [ -n "$_ms_ok" ]; then
    # this checkout, editable (several clones may share one environment: point it at this one)
    _ms_where=$(cd / && "$TNLLM_METASEQ_VENV/bin/python" -c 'import os, tnllm_plugin; print(os.path.dirname(os.path.dirname(tnllm_plugin.__file__)))' 2>/dev/null || true)
    if [ "$_ms_where" != "$_ms_root" ]; then
        # --use-pep517: an editable install that maps kernels/ to tnllm_kernels (pip's legacy develop mode,
        # its choice for a project without pyproject.toml in some environments, would only add the checkout)
        "$TNLLM_METASEQ_VENV/bin/python" -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation \
            --use-pep517 -e "$_ms_root" >/dev/null || _ms_ok=
    fi
fi
unset -f _ms_source _ms_build
unset _ms_commit _ms_hash _ms_where
if [ -z "$_ms_ok" ]; then
    unset _ms_ok _ms_root
    _ms_fail "no Metaseq environment"; _r=$?; unset -f _ms_fail; return $_r 2>/dev/null || exit $_r
fi
unset -f _ms_fail
unset _ms_ok _ms_root
export TNLLM_METASEQ_VENV
export PATH="$TNLLM_METASEQ_VENV/bin:$PATH"
