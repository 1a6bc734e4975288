"""benchmarks/decode_linear_tiles.py on CPU: the tiles it sweeps and the table it prints (the timings themselves need
a GPU)."""
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
triton = pytest.importorskip("triton")

import decode_linear_tiles as sweep  # noqa: E402


def test_candidates_of_both_forms():
    """On the 385M layers: broadcast tiles at every row count, tl.dot tiles from 5 rows (rows padded to 16, every
    block at least 16, as decode_linear_triton requires), all with at least 32 programs and K tiles no wider than
    K's power of two; K split over 2, 4 or 8 programs only for tiles of fewer than 264 column tiles, into parts of at
    least one K tile, and each split candidate also unsplit."""
    for name, n, k, kw in sweep.LAYERS:
        for m in (1, 4, 5, 8, 16):
            tiles = sweep.candidates(m, n, k, kw.get("glu", False))
            dots = [t for t in tiles if t[4]]
            assert (len(dots) > 0) == (m >= 5) and len(dots) < len(tiles), (name, m)
            split = [t for t in tiles if len(t) == 6]
            assert split and all(t[:5] in tiles for t in split), (name, m)
            for block_m, block_n, block_k, warps, dot, *split_k in tiles:
                assert block_m >= m and warps in (2, 4, 8) and triton.cdiv(n, block_n) >= 32
                assert block_k <= max(128, triton.next_power_of_2(k))
                assert not dot or (block_m == 16 and block_n in (16, 32, 64) and 128 <= block_k <= 1024)
                if split_k:
                    assert split_k[0] in (2, 4, 8) and triton.cdiv(n, block_n) < 264
                    assert triton.cdiv(k, block_k) >= split_k[0]


def test_table_reports_the_best_of_each_form():
    """The fastest overall and of each form per layer and rows ("-" where a form has no candidates), GB/s from the
    best time, and the block's sums per row count."""
    bc, dot, dot2 = (16, 2, 128, 8, False), (16, 16, 512, 4, True), (16, 32, 256, 4, True)
    at16 = sweep.summarize("l3", 16, 1024, 2816, False, 30.0, dot, 12.0, [(20.0, bc), (10.0, dot), (11.0, dot2)])
    at1 = sweep.summarize("l3", 1, 1024, 2816, False, 9.0, (1, 4, 1024, 2, False), 6.0,
                          [(6.5, (1, 4, 1024, 2, False)), (6.0, (1, 2, 2048, 2, False))])
    assert at16["best_tiles"] == dot and at16["best_broadcast_us"] == 20.0 and at16["best_dot_tiles"] == dot
    assert at16["all"][0] == (dot, 10.0)
    # 1024 x 2816 bf16 weights in 10 us: 577 GB/s
    assert sweep.table_line(at16) == ("| l3 | 16 | 30.00 | 12.00 | (16, 16, 512, 4, True) | 20.00 | "
                                      "(16, 2, 128, 8, False) | 10.00 | (16, 16, 512, 4, True) | 577 |")
    assert sweep.table_line(at1).endswith("| 6.00 | (1, 2, 2048, 2, False) | - | - | 961 |")
    assert len(sweep.table_line(at1).split("|")) == len(sweep.HEADER[0].split("|"))
    assert sweep.block_line([at1, at16], [1, 16]) == (
        "per block of the 385M model (four layers, us), rows 1: composition 9.0, today 6.0, best 6.0 (broadcast 6.0, "
        "tl.dot -), 16: composition 30.0, today 12.0, best 10.0 (broadcast 20.0, tl.dot 10.0)")


def test_a_candidate_off_the_composition_is_refused():
    """runs(): True for an output like the composition's, an AssertionError for one that is not (the sweep lists
    such candidates instead of timing them)."""
    import torch
    expected = torch.linspace(-1, 1, 64)
    assert sweep.runs(lambda: expected.to(torch.bfloat16), expected)
    with pytest.raises(AssertionError, match="off the composition"):
        sweep.runs(lambda: expected.flip(0), expected)
