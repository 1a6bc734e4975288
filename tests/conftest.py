import os

import pytest
import torch

# Without CUDA the kernel tests run Triton's CPU interpreter, and TRITON_INTERPRET=1 must be set before Triton itself
# is first imported, not only before a kernel module is: Triton's own library (tl.sum, tl.max, tl.sigmoid, tl.cdiv,
# ... in triton.language.standard) is @triton.jit-decorated once, at that import, and an interpreted kernel that
# calls a library function decorated without the interpreter fails ("Cannot call @triton.jit'd outside of the
# scope of a kernel"); triton_cpu.import_kernel_module's reload cannot redo it. Any test module that imports Triton
# at collection would otherwise fix that for every kernel test collected after it (tests/test_lightning_benchmark.py
# does, through benchmarks/lightning_attention.py). Set here, before any test module is imported (neither torch nor
# shared_data imports Triton). On the CPU the kernels run only where a test asks for them (the packages'
# interpret_on_cpu flags, or a direct call); with CUDA the interpreter is never set, as it would replace the GPU
# kernels in this process. Subprocesses that must compile for real take it out (triton_cpu.compile_for_sm90).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from shared_data import RELEASED_TINY  # noqa: E402


def pytest_report_header(config):
    found = "found" if (RELEASED_TINY / "config.json").is_file() else "MISSING (set TNLLM_SHARED_DIR)"
    return f"released_tiny fixture: {RELEASED_TINY} ({found})"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")
    config.addinivalue_line("markers", "slow: end-to-end runs of a host (subprocesses)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["composition", "fused", "fused_layer"])
def decode_path(request, monkeypatch):
    """The model's one-token step as the PyTorch composition (None), through tnllm_kernels.gla_decode's fused
    Triton step ("fused"), or with the whole block fused ("fused_layer": the step, and each linear layer as one
    tnllm_kernels.decode_linear GEMV with its norm, gate, product or residual add): on a machine without CUDA the
    model (on the CPU) is let take the kernels in Triton's interpreter, and the fixture gives the list of the step
    kernel's calls, so a test can check that the path it meant ran (with "fused_layer" the GEMV kernel runs four
    times with each step on the layers it takes; tests/test_decode_linear.py checks that it does). With CUDA the
    interpreter is not used (it would replace the GPU kernels in this process): the gpu tests cover those paths."""
    if request.param == "composition":
        yield None
        return
    if torch.cuda.is_available():
        pytest.skip("the interpreted fused step is for CPU-only machines; the gpu tests run it on CUDA")
    import importlib
    import sys

    import tnllm_kernels.gla_decode as gla_decode
    monkeypatch.setenv("TRITON_INTERPRET", "1")           # before Triton and the kernels are decorated
    pytest.importorskip("triton")
    from triton_cpu import uninterpreted_triton
    reason = uninterpreted_triton()
    if reason is not None:
        pytest.skip(reason)

    def load(name):     # the GEMV kernel uses the step module's rounding: reloaded after it
        return importlib.reload(sys.modules[name]) if name in sys.modules else importlib.import_module(name)
    module = load("tnllm_kernels.gla_decode.triton_step")
    calls = []
    real = module.gla_decode_step_triton
    monkeypatch.setattr(module, "gla_decode_step_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(gla_decode, "interpret_on_cpu", True)
    gemv_calls = []
    if request.param == "fused_layer":
        import tnllm_kernels.decode_linear as decode_linear
        gemv = load("tnllm_kernels.decode_linear.triton_gemv")
        real_gemv = gemv.decode_linear_triton
        monkeypatch.setattr(gemv, "decode_linear_triton", lambda *a, **k: gemv_calls.append(1) or real_gemv(*a, **k))
        monkeypatch.setattr(decode_linear, "interpret_on_cpu", True)
    yield calls
    # the fused block takes the released layer only (SRMSNorm, no bias): other configurations keep the step alone
    assert len(gemv_calls) in (0, 4 * len(calls)), "the fused block's GEMVs ran for some steps, not all"


@pytest.fixture
def count_gluon_launches(monkeypatch):
    """count(gluon_walk) -> [single walks, paired dk+dv walks] launched from then on, counted through gluon_walk's
    two launchers (the attention and the model-level Gluon tests check which walks took the Gluon path)."""
    def count(gluon_walk):
        counts = [0, 0]
        for i, name in enumerate(("walk", "walk_pair")):
            launch = getattr(gluon_walk, name)

            def counted(*args, i=i, launch=launch, **kwargs):
                counts[i] += 1
                return launch(*args, **kwargs)
            monkeypatch.setattr(gluon_walk, name, counted)
        return counts
    return count
