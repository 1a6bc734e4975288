# On the GPU machine, sourced first: install the carried wheels (fetch_device_wheels.sh) into /tmp/site and
# make this checkout importable (tnllm_plugin, and kernels/ under its installed name tnllm_kernels).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
mkdir -p /tmp/tnllm_path && ln -sfn "$PWD/kernels" /tmp/tnllm_path/tnllm_kernels
export PYTHONPATH="/tmp/site:/tmp/tnllm_path:$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/site/bin:$PATH" PYTHONUNBUFFERED=1
# Triton's compile and autotune caches inside the checkout (ignored, so kept between calls while the machine is
# warm): fla's autotuning, minutes for each new shape, then runs once per machine rather than once per call.
export TRITON_CACHE_DIR="$PWD/.triton_cache" TRITON_CACHE_AUTOTUNING=1
