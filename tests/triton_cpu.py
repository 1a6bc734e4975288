"""Triton kernels on CPU tensors: without CUDA, Triton's interpreter (TRITON_INTERPRET=1) runs them at small shapes.
The variable must be set before the @triton.jit decorations run: Triton's own library's (tl.sum, ...), at Triton's
first import, which tests/conftest.py sees to by setting it before any test module is imported, and the kernel
module's, so a kernel test imports its kernel module through ``import_kernel_module`` before anything else of the
kernel's package."""
import importlib
import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def uninterpreted_triton():
    """Why Triton's kernels cannot run in its interpreter in this process, or None. Triton's own library (tl.sum, ...)
    is decorated once, at Triton's first import, so TRITON_INTERPRET=1 must be set before that (tests/conftest.py
    sets it first); no reload of a kernel module redoes it."""
    import triton
    from triton.runtime.interpreter import InterpretedFunction
    if isinstance(triton.language.standard.sum, InterpretedFunction):
        return None
    return "Triton was imported in this process before TRITON_INTERPRET=1: its library (tl.sum, ...) is not interpreted"


def import_kernel_module(name: str):
    """The kernel module ``name``, decorated for the interpreter when there is no CUDA; skips without Triton."""
    if not CUDA:
        os.environ["TRITON_INTERPRET"] = "1"
    pytest.importorskip("triton")
    # a reload cannot re-decorate Triton's library: say so here rather than in every kernel test's failure
    reason = None if CUDA else uninterpreted_triton()
    if reason is not None:
        raise RuntimeError(f"{reason}, so no kernel test can run")
    if not CUDA and name in sys.modules:        # imported earlier without the interpreter: decorate again
        return importlib.reload(sys.modules[name])
    return importlib.import_module(name)


def compile_for_sm90(kernel_module: str, kernel: str, cases, count_in_ptx: str = "griddepcontrol.wait",
                     divisible=(), max_shared=None):
    """Compile ``kernel`` of ``kernel_module`` for an H100/H200 (sm_90) through Triton's NVIDIA compiler down to
    ptxas, which Triton's wheel ships, without a GPU: the GPU path the interpreter cannot check (libdevice, tl.dot,
    the layouts). ``cases``: (signature, constexprs, num_warps) triples, as triton.compile's ASTSource takes them. In
    a subprocess, as this process's kernels are interpreted. Returns, per case, how often ``count_in_ptx`` occurs in
    the PTX (by default the programmatic-dependent-launch wait). ``divisible``: the arguments (pointers, integers)
    to compile as multiples of 16, as Triton's launcher specializes them on the GPU when they are (torch's
    allocations, the real shapes' strides): without it loads are not vectorised and tl.dot's operands not pipelined
    through shared memory, which is not the code the GPU runs. ``max_shared``: fail a case that needs more shared
    memory per block (bytes) than this: on the GPU its launch raises OutOfResources. Skips where a GPU runs the
    kernels anyway, or without ptxas."""
    import json
    import subprocess
    from pathlib import Path
    if CUDA:
        pytest.skip("on a GPU the kernel is compiled and run by the other tests")
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").is_file():
        pytest.skip("Triton's NVIDIA backend (ptxas) is not installed")
    script = (f"import importlib, json, triton\nfrom triton.backends.compiler import GPUTarget\n"
              f"from triton.compiler import ASTSource\nfn = getattr(importlib.import_module({kernel_module!r}), {kernel!r})\n"
              f"attrs = {{(fn.arg_names.index(a),): [['tt.divisibility', 16]] for a in {tuple(divisible)!r}}}\n"
              f"max_shared = {max_shared!r}\ncounts = []\nfor sig, consts, warps in {list(cases)!r}:\n"
              f"    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget('cuda', 90, 32), "
              f"options=dict(num_warps=warps))\n"
              f"    assert max_shared is None or k.metadata.shared <= max_shared, "
              f"f'{{consts}}: {{k.metadata.shared}} bytes of shared memory'\n"
              f"    counts.append(k.asm['ptx'].count({count_in_ptx!r}))\n"
              f"print('compiled', json.dumps(counts))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]
    return json.loads(out.stdout.split("compiled", 1)[1])
