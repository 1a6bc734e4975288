import pytest
import torch

from shared_data import RELEASED_TINY


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
    triton = pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction
    if not isinstance(triton.language.standard.sum, InterpretedFunction):
        pytest.skip("Triton was imported in this process before TRITON_INTERPRET=1: its library is not interpreted")

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
