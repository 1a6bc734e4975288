"""Whether Triton runs the kernels in its CPU interpreter (TRITON_INTERPRET=1, what the tests set without a GPU): the
kernels then take CPU tensors, a single launch configuration, and the operand forms the interpreter computes right.
Read at each call, not at import: the tests set the variable before they import a kernel module."""
import os


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
