"""benchmarks/lightning_attention.py's report on CPU: the memory floor and the multiples of it it prints, and the
--methods names it takes (the timings themselves need a GPU)."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
pytest.importorskip("triton")

import lightning_attention as la  # noqa: E402


def test_floor_and_multiples():
    """8 bf16 tensors of 32768 x 16 x 128 at 4.3 TB/s: 0.250 ms forward+backward (the issue's floor), 0.125 forward;
    each method's time over it, replayed from a CUDA graph where it was (the goal's measure), else timed call to call
    and marked, and an out-of-memory cell passed through as such."""
    rows = [dict(N=1024, B=32, method="ours", fb_ms=1.0, fb_graph_ms=0.75),
            dict(N=1024, B=32, method="SDPA softmax", fb_ms="OOM", fb_graph_ms="OOM"),
            dict(N=2048, B=16, method="ours", fb_ms=0.5, fb_graph_ms=0.625),
            dict(N=2048, B=16, method="SDPA softmax", fb_ms=2.5, fb_graph_ms=None)]
    lines = la.floor_lines(rows, H=16, D=128, tbs=4.3).splitlines()
    assert lines[-2] == "| 1024 | 32 | 0.250 | 0.125 | 3.0x | OOM |"
    assert lines[-1] == "| 2048 | 16 | 0.250 | 0.125 | 2.5x | 10.0x* |"


def test_methods_flag_refuses_unknown_names_and_needs_ours():
    """Checked before anything else (no GPU needed to be told)."""
    for bad, named in (("ours,flash", "['flash']"), ("sdpa", "'ours' must be among them")):
        out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "lightning_attention.py"), "--methods", bad],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode != 0 and out.stderr.startswith("--methods:") and named in out.stderr, out.stderr
    assert set(la.METHOD_NAMES) == {"ours", "naive", "fla_g", "fla_g_gamma", "lightning_attn2", "sdpa"}


def test_register_report_compiles_every_kernel_for_sm90(tmp_path):
    """benchmarks/lightning_registers.py compiles the four walks and the pre-pass for sm_90a without a GPU and reads
    ptxas's report: every kernel's constexprs must be given (a new one without a value fails here) and the counts
    must parse. With --ptx-dir it writes each kernel's PTX without debug lines and labels (for comparing the code
    before and after a refactor). In a subprocess: the tests import the kernels under Triton's interpreter, which
    cannot compile."""
    import os
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "lightning_registers.py"), "--configs", "8x1",
                          "--ptx-dir", str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    rows = [line.split(" | ") for line in out.stdout.splitlines() if line.startswith("| current |")]
    assert [r[1] for r in rows] == ["walk o (forward)", "walk dq", "walk dk", "walk dv", "pre-pass (backward)"]
    for r in rows:
        regs, spills = int(r[3]), [int(x) for x in r[4].split(" / ")]
        assert 0 < regs <= 255 and min(spills) >= 0 and float(r[5].strip(" |")) > 0, r
    written = sorted(p.name for p in tmp_path.iterdir())
    assert len(written) == 5 and "current_walk_dq_8x1.ptx" in written, written
    ptx = (tmp_path / "current_walk_dq_8x1.ptx").read_text()
    assert ".entry _walk_kernel" in ptx, ptx[:300]
    assert not any(line.lstrip().startswith((".loc", ".file")) or line.startswith("$L__tmp")
                   for line in ptx.splitlines()), "debug lines left in the PTX"


def test_replay_timeline_counts_the_gpu_idle_between_kernels():
    """compare_lightning_kernels --graph-gaps: per replay, overlapping kernels count once as busy, the time between
    them is idle; records that do not split evenly into replays are refused."""
    import compare_lightning_kernels as clk
    records = [(15, 25), (0, 10), (12, 20), (100, 110), (110, 120), (130, 140)]     # two replays of three kernels
    assert clk.replay_timeline(records, 2) == (3, (23 + 30) / 2, (25 + 40) / 2)
    with pytest.raises(ValueError, match="5 kernel records"):
        clk.replay_timeline(records[:5], 2)
