"""Asking L2 for memory that a kernel will load soon: ``prefetch.global.L2`` on each address. No register waits for
it and nothing comes back, so the kernel goes on at once, and the load that follows finds its lines in L2 instead of
waiting for HBM. The addresses must lie inside the tensor. Triton's CPU interpreter runs no inline PTX, so callers
turn the prefetch off there (a constexpr set from ``interpreting()``); it changes no result, only when data arrives."""
import triton
import triton.language as tl


@triton.jit
def prefetch_l2(ptrs):
    """One ``prefetch.global.L2`` per element of the pointer tensor ``ptrs``."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs.to(tl.int64)],
                              dtype=tl.int32, is_pure=False, pack=1)
