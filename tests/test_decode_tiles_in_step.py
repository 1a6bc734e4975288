"""benchmarks/decode_tiles_in_step.py on CPU: the tiles it tries and how it puts them in force (the timings need a
GPU)."""
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
pytest.importorskip("triton")

import decode_tiles_in_step as sweep  # noqa: E402


def test_neighbours_move_one_coordinate_within_the_forms_limits():
    """Each candidate differs from today's tiles in one coordinate (or only adds pipeline stages 2 / 4 to the tl.dot
    form), never repeats them, and stays within what the kernels take: tl.dot blocks of at least 16, BLOCK_K at most
    K's power of two (1024 for tl.dot), the broadcast form at most 256 products a thread; the step's BLOCK_V 16 to
    the head dim."""
    tiles = sweep.Tiles()
    try:
        for batch in (1, 4, 8, 16):
            for name, today in tiles.today(batch).items():
                cands = sweep.neighbours(name, today, sweep.LAYER_K.get(name))
                assert cands and len(set(cands)) == len(cands) and today not in cands, (batch, name)
                if name == "step":
                    assert all(16 <= bv <= sweep.HEAD_DIM and w in (1, 2, 4, 8) for bv, w in cands)
                    assert all((bv == today[0]) != (w == today[1]) for bv, w in cands)
                    continue
                base = list(today[:5]) + [today[5] if len(today) > 5 else 1]
                k = sweep.LAYER_K[name]
                for t in cands:
                    bm, bn, bk, w, dot = t[:5]
                    moved = sum(a != b for a, b in zip(t[:6], base))
                    assert moved == 1 or (moved == 0 and len(t) == 7 and t[6] in (2, 4) and dot), (name, t)
                    assert bm == base[0] and dot == base[4] and w in (2, 4, 8) and 1 <= t[5] <= 8
                    assert bk <= min(1 << (k - 1).bit_length(), 1024 if dot else 2048)
                    assert min(bn, bk) >= 16 if dot else bm * bn * bk * (2 if name == "sglu" else 1) <= 256 * 32 * w
    finally:
        tiles.restore()


def test_overrides_reach_the_kernels_tile_functions_and_only_the_named_layer():
    from tnllm_kernels.decode_linear import triton_gemv
    from tnllm_kernels.gla_decode import triton_step
    rule_gemv, rule_step = triton_gemv._tiles, triton_step._step_tiles
    tiles = sweep.Tiles()
    try:
        tiles.override = {"qkvu": (16, 64, 512, 8, True), "step": (32, 4)}
        assert triton_gemv._tiles(16, 4096, 1024, False) == (16, 64, 512, 8, True)
        assert triton_gemv._tiles(16, 1024, 2816, False) == rule_gemv(16, 1024, 2816, False)       # l3: today's
        assert triton_gemv._tiles(16, 300, 1024, False) == rule_gemv(16, 300, 1024, False)         # other shapes
        assert triton_step._step_tiles(128, 128, False) == (32, 4)
        assert triton_step._step_tiles(128, 128, True) == rule_step(128, 128, True)              # LRPE's layer
    finally:
        tiles.restore()
    assert (triton_gemv._tiles, triton_step._step_tiles) == (rule_gemv, rule_step)
