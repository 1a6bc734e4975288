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


@pytest.fixture(params=["composition", "fused"])
def decode_path(request, monkeypatch):
    """The model's one-token step as the PyTorch composition (None), or through tnllm_kernels.gla_decode's fused
    Triton step: on a machine without CUDA the model (on the CPU) is let take it in Triton's interpreter, and the
    fixture gives the list of the kernel's calls, so a test can check that the path it meant ran. With CUDA the
    interpreter is not used (it would replace the GPU kernels in this process): the gpu tests cover that path."""
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
    name = "tnllm_kernels.gla_decode.triton_step"
    module = importlib.reload(sys.modules[name]) if name in sys.modules else importlib.import_module(name)
    calls = []
    real = module.gla_decode_step_triton
    monkeypatch.setattr(module, "gla_decode_step_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(gla_decode, "interpret_on_cpu", True)
    yield calls
