#!/usr/bin/env bash
# Here (a machine with PyPI): put into .whl/ the wheels the GPU machine lacks (it has torch, triton, transformers
# but no network): fairseq and its pins, fairscale, flash-linear-attention. ~25 MB, under the 64 MiB carry limit.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info && { grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude; }
mkdir -p .whl
platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
    -d .whl fairseq-fixed==0.12.3.1 hydra-core==1.3.2 omegaconf==2.3.0 bitarray==3.12.3 \
    flash-linear-attention==0.6.0 fla-core==0.6.0
# pure-Python packages published only as source: build their wheels here
python3 -m pip wheel -q --no-deps -w .whl fairscale==0.4.13 antlr4-python3-runtime==4.9.3
ls -la .whl
