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
