"""Triton kernels on CPU tensors: without CUDA, Triton's interpreter (TRITON_INTERPRET=1) runs them at small shapes.
The variable must be set before a kernel module's @triton.jit decorations run, so a kernel test imports its kernel
module through ``import_kernel_module`` before anything else of the kernel's package."""
import importlib
import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def import_kernel_module(name: str):
    """The kernel module ``name``, decorated for the interpreter when there is no CUDA; skips without Triton."""
    if not CUDA:
        os.environ["TRITON_INTERPRET"] = "1"
    pytest.importorskip("triton")
    if not CUDA and name in sys.modules:        # imported earlier without the interpreter: decorate again
        return importlib.reload(sys.modules[name])
    return importlib.import_module(name)
