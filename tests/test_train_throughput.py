"""benchmarks/train_throughput.py's step profile on CPU: the kernel categories name our Triton kernels, GEMMs and the
optimizer by what they are; the breakdown's times and busy share are the sums it claims; the --smoke profile of a
step variant runs and prints the breakdown."""
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import train_throughput as tt  # noqa: E402


@pytest.mark.parametrize("name, category", [
    ("_seg_local_kernel", "lightning attention (Triton)"),
    ("_walk_kernel", "lightning attention (Triton)"),
    ("_srms_bwd_kernel", "SRMSNorm, norm+gate (Triton)"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "GEMM"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", "GEMM"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>", "cross entropy"),
    ("void at::native::reduce_kernel<512, 1, ReduceOp<float, sum>>", "reductions"),
    ("void at::native::unrolled_elementwise_kernel<direct_copy_kernel_cuda>", "copies, casts, fills"),
    ("void at::native::vectorized_elementwise_kernel<4, silu_kernel>", "elementwise"),
    ("aten::mm", "GEMM"),
    ("ncclDevKernel_AllReduce", "other"),
])
def test_kernel_category(name, category):
    assert tt.kernel_category(name) == category


def test_kernel_breakdown_sums_per_step():
    kernels = [("_walk_kernel", 3000.0), ("nvjet_gemm", 5000.0), ("cutlass_gemm", 1000.0), ("mystery", 1000.0)]
    lines = tt.kernel_breakdown(kernels, wall_ms=20.0, steps=2)
    rows = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| ")}
    assert "| 3.00 | 60.0% |" in rows["GEMM"]            # (5000 + 1000) us / 2 steps; 6 of 10 ms busy
    assert "| 1.50 | 30.0% |" in rows["lightning attention (Triton)"]
    assert "| 0.50 | 10.0% |" in rows["other"]
    assert lines[-1] == "device busy 5.00 ms of a 10.00 ms step (50.0%)"
    assert lines.index(rows["GEMM"]) < lines.index(rows["other"])          # largest first


def test_smoke_profile_of_a_step_variant():
    torch.manual_seed(0)
    text = tt.profile_step("transnormer_llm_385m_no_recompute", dict(tt.SMOKE), torch.device("cpu"), seq=32)
    assert text.startswith("profile of transnormer_llm_385m_no_recompute: 2 steps, seq 32, batch 8")
    assert "| GEMM |" in text and "device busy" in text


def test_master_weights_adamw_is_adamw_on_fp32_copies():
    """A bf16 model's step through MasterWeightsAdamW: the fp32 masters take exactly the step torch's AdamW takes on
    fp32 weights with the same gradients, and the model's bf16 weights become the masters rounded to bf16."""
    torch.manual_seed(0)
    ref = torch.nn.Linear(16, 8)
    ref.weight.data, ref.bias.data = ref.weight.data.bfloat16().float(), ref.bias.data.bfloat16().float()
    low = torch.nn.Linear(16, 8).to(torch.bfloat16)
    low.load_state_dict({k: v.bfloat16() for k, v in ref.state_dict().items()})
    start = low.weight.detach().clone()
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt_low = tt.MasterWeightsAdamW(low.parameters(), lr=1e-2, fused=False)
    for step in range(3):
        grads = [torch.randn_like(p).bfloat16() for p in ref.parameters()]
        for p, q, g in zip(ref.parameters(), low.parameters(), grads):
            p.grad, q.grad = g.float(), g.clone()
        opt_ref.step()
        opt_low.step()
        opt_low.zero_grad()
        assert all(q.grad is None for q in low.parameters())
        for p, m, q in zip(ref.parameters(), opt_low.master, low.parameters()):
            assert m.dtype == torch.float32 and torch.equal(m, p.detach())
            assert q.dtype == torch.bfloat16 and torch.equal(q.detach(), p.detach().bfloat16())
    assert not torch.equal(low.weight.detach(), start)        # the steps moved the model's weights


def test_smoke_bf16_variants_train():
    """The bf16-weights rows at smoke sizes on CPU: they run, their weights stay bf16, and 4 steps of the loss
    curve bring the loss down."""
    s = dict(tt.SMOKE)
    for name in ("transnormer_llm_385m_bf16", "transnormer_llm_385m_bf16_keep_inputs"):
        torch.manual_seed(0)
        model, loss_fn, opt = tt.variant_with_optimizer(name, s, torch.device("cpu"), lr=1e-2)
        assert isinstance(opt, tt.MasterWeightsAdamW)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        curve = tt.loss_curve(name, s, torch.device("cpu"), 4)
        assert all(torch.isfinite(torch.tensor(curve))) and curve[-1] < curve[0]


def test_graph_row_is_skipped_on_the_cpu_with_its_reason():
    """--smoke runs on the CPU, where a CUDA graph cannot: the graph row's table row, loss curve and profile say so
    (and nothing is built), the other rows are untouched."""
    cpu = torch.device("cpu")
    s = dict(tt.SMOKE)
    for graph_row, eager_row in tt.GRAPH_ROWS.items():
        assert graph_row.startswith("transnormer_llm_385m")         # among "our" rows: in the loss table
        assert tt.run_model(graph_row, s, cpu) == {"skipped": "CUDA graphs need CUDA (--smoke runs on the CPU)"}
        assert tt.profile_step(graph_row, s, cpu, seq=32) == (f"profile of {graph_row}: skipped (CUDA graphs need "
                                                              f"CUDA (--smoke runs on the CPU))")
        text = tt.loss_table({eager_row: [5.0, 4.0], graph_row: tt.skip_reason(graph_row, cpu)})
        assert f"| {graph_row} | skipped: CUDA graphs need CUDA" in text and "loss of the first 2 steps" in text
        assert tt.skip_reason(eager_row, cpu) is None


def test_memory_text_shows_reserved_memory_where_measured():
    assert tt.memory_text([dict(peak_gb=24.94), dict(peak_gb=20.0)]) == "24.9"
    assert tt.memory_text([dict(peak_gb=24.94, reserved_gb=25.31), dict(peak_gb=20.0, reserved_gb=21.0)]) == \
        "24.9 (reserved 25.3)"


def test_loss_table_compares_a_graph_row_with_its_eager_row():
    graph_row, eager_row = next(iter(tt.GRAPH_ROWS.items()))
    same = tt.loss_table({eager_row: [5.0, 4.0], graph_row: [5.0, 4.0]})
    assert f"{graph_row} against {eager_row}: bit for bit over the 2 steps" in same
    apart = tt.loss_table({eager_row: [5.0, 4.0], graph_row: [5.0, 4.001]})
    assert f"{graph_row} against {eager_row}: max abs gap 0.001 over the 2 steps" in apart


@pytest.mark.gpu
def test_graph_row_trains_as_its_eager_row():
    """At smoke sizes on the GPU: the graph row's loss curve (its eager warm-up, the capture, replays) is its eager
    row's, bit for bit, and measure() reports the memory its graph keeps reserved."""
    s = dict(tt.SMOKE, warmup=3, steps=3)
    cuda = torch.device("cuda")
    for graph_row, eager_row in tt.GRAPH_ROWS.items():
        eager = tt.loss_curve(eager_row, s, cuda, 6)
        assert tt.loss_curve(graph_row, s, cuda, 6) == eager
        result = tt.run_model(graph_row, dict(s, seqs=(64,)), cuda)
        measured = result["seqs"][64]
        assert measured["reserved_gb"] > 0 and measured["tokens_per_s"] > 0


def test_table_gives_our_steps_against_every_anchor_measured():
    """Each of our bf16 steps against the bf16 LLaMA and fla's models, where both were measured; no "ours" line
    (the fp32 step's) when that step was not run: it printed "n/a" for every cell in the fifteenth and sixteenth
    sessions' tables."""
    def row(*tokens_per_s):
        return {"params": 4e8, "seqs": {n: {"tokens_per_s": t, "peak_gb": 20.0, "loss": 1.0}
                                        for n, t in zip((2048, 8192), tokens_per_s)}}
    results = {"transnormer_llm_385m_bf16_graph": row(200e3, 180e3), "llama_385m_sdpa_bf16": row(100e3, 90e3),
               "fla_retnet": row(80e3, 120e3), "fla_gla": row(50e3, 60e3)}
    text = tt.table(results, dict(tt.FULL, seqs=[2048, 8192]), {})
    assert "transnormer_llm_385m_bf16_graph / llama_385m_sdpa_bf16: seq 2048: 2.00x, seq 8192: 2.00x" in text
    assert "transnormer_llm_385m_bf16_graph / fla_retnet: seq 2048: 2.50x, seq 8192: 1.50x" in text
    assert "transnormer_llm_385m_bf16_graph / fla_gla: seq 2048: 4.00x, seq 8192: 3.00x" in text
    assert "fla_retnet_fused_loss" not in text and "ours / " not in text
