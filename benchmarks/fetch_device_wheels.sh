#!/usr/bin/env bash
# Here (a machine with PyPI): put into .whl/ the wheels the GPU machine lacks (it has torch, triton, transformers
# but no network): fairseq and its pins, fairscale, flash-linear-attention, lightning-attn (the paper authors'
# kernel, the anchor of benchmarks/lightning_attention.py); for Metaseq, what its image lacks of
# scripts/metaseq_requirements.txt and Metaseq's source archive (from ../shared/vendor). ~41 MB, under the
# 64 MiB carry limit. On the GPU machine:
#   source benchmarks/device_env.sh                       (fairseq and the plugin, into /tmp/site)
#   TNLLM_METASEQ_SYSTEM_TORCH=1 PIP_NO_INDEX=1 PIP_FIND_LINKS=$PWD/.whl TNLLM_METASEQ_SOURCE=$PWD/.whl \
#       source scripts/ensure_metaseq.sh                  (Metaseq, in a venv over the image's torch)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info && { grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude; }
mkdir -p .whl
platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
    -d .whl fairseq-fixed==0.12.3.1 hydra-core==1.3.2 omegaconf==2.3.0 bitarray==3.12.3 \
    flash-linear-attention==0.6.0 fla-core==0.6.0 lightning-attn==0.0.5
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
    -d .whl more-itertools==10.8.0 fire==0.7.1 termcolor==3.1.0 flask==3.1.2 itsdangerous==2.2.0 blinker==1.9.0 \
    boto3==1.40.49 botocore==1.40.49 s3transfer==0.14.0 jmespath==1.0.1
# pure-Python packages published only as source: build their wheels here
python3 -m pip wheel -q --no-deps -w .whl fairscale==0.4.13 antlr4-python3-runtime==4.9.3 iopath==0.1.10 \
    timeout-decorator==0.5.0
cp "${TNLLM_SHARED_DIR:-../shared}"/vendor/metaseq-f7ffa5fd61cf90f498a36d365c13dd7f1a912ff7.tar.gz .whl/
ls -la .whl
