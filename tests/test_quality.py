"""The quality benchmark's pieces on CPU (benchmarks/quality.py, benchmarks/quality_models): the LLaMA baseline is
causal, it has TransNormerLLM's parameter count at the benchmark's size, and one tiny run goes end to end through
fairseq-train and fairseq-validate (the smoke settings, on a synthetic data-bin with a small vocabulary)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "scripts"))

import quality  # noqa: E402
from quality_models import LlamaConfig, LlamaLM  # noqa: E402


def test_baseline_is_causal():
    torch.manual_seed(0)
    model = LlamaLM(LlamaConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, ffn_dim=48)).eval()
    tokens = torch.randint(4, 50, (2, 24))
    changed = tokens.clone()
    changed[:, 15] = (tokens[:, 15] + 7) % 46 + 4          # another token at position 15 only
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.equal(a[:, :15], b[:, :15])                 # positions before it see nothing of it
    assert (a[:, 15:] - b[:, 15:]).abs().amax() > 1e-3      # from it on, the logits change


def test_baseline_rotary_positions_are_relative():
    # RoPE makes the q.k score a function of the offset between positions: the same pair of vectors scores the
    # same at positions (5, 2) and (9, 6), otherwise at (5, 1)
    from quality_models import rotary
    torch.manual_seed(1)
    q, k = torch.randn(1, 1, 1, 8).double(), torch.randn(1, 1, 1, 8).double()
    rows = lambda x, n: x.expand(1, 1, n, 8)              # noqa: E731  the vector at every position 0..n-1
    rq, rk = rotary(rows(q, 10), 10000.0), rotary(rows(k, 10), 10000.0)
    score = lambda s, t: (rq[0, 0, s] * rk[0, 0, t]).sum().item()   # noqa: E731
    assert score(5, 2) == pytest.approx(score(9, 6), rel=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 1), rel=1e-3)


def test_parameter_counts_within_three_percent():
    # at the benchmark's size and the corpus' vocabulary (32000 pieces, fairseq pads the dictionary to 32000)
    tnl = quality.parameter_counts(quality.FULL, 32000)
    llama = quality.parameter_counts(quality.FULL, 32000, dict(model="llama"))
    assert 100e6 <= tnl["total"] <= 150e6
    for key in ("total", "non_embedding"):
        assert abs(llama[key] / tnl[key] - 1) < 0.03, (key, tnl, llama)
    # the counts come from the models as built: a baseline of the plain 8/3 width would be 8% smaller
    narrow = dict(quality.FULL, glu=2048)
    assert quality.llama_ffn_dim(narrow) == 2304


def test_every_run_is_listed_with_its_flags(capsys):
    quality.main(["--list"])
    out = capsys.readouterr().out
    for name in quality.runs_for(quality.FULL):
        assert name in out
    assert "decay-schedule no-temperature" in out and "lrpe-layers 0,1,2,3,4,5,6,7,8,9,10,11" in out
    assert "60.0M tokens" in out and "10.0M tokens" in out


@pytest.mark.parametrize("item, message", [("seq=2.5", "seq takes an integer"), ("seq=long", "'long' is not a number"),
                                           ("colour=1", "not a numeric setting"), ("lrs=1e-3", "not a numeric setting")])
def test_set_refuses_what_it_cannot_apply(item, message):
    with pytest.raises(SystemExit) as e:
        quality.main(["--list", "--set", item])
    assert message in str(e.value)


@pytest.mark.parametrize("text", ["trian=3000", "train=3e6", "valid=0", "train"])
def test_smoke_slice_refuses_what_it_cannot_apply(text):
    with pytest.raises(SystemExit, match="is not SPLIT=TOKENS"):
        quality.main(["--list", "--smoke", "--smoke-slice", text])


def test_smoke_slice_sizes():
    assert quality.smoke_slice_sizes(None) == quality.SMOKE_SLICE
    assert quality.smoke_slice_sizes("train=3000000,test=50") == dict(quality.SMOKE_SLICE, train=3_000_000, test=50)


def test_set_applies_numbers(capsys):
    quality.main(["--list", "--set", "main_tokens=3e7", "--set", "ablation_lr=2e-3"])
    out = capsys.readouterr().out
    assert "30.0M tokens" in out and "lr 2.0e-03" in out


def test_block_form_refused_on_cuda_tensors():
    # on a GPU the benchmark installs this guard: attention that would take the PyTorch block form on CUDA stops
    import importlib
    import types

    from quality_models import refuse_block_form_on_cuda
    dispatch = importlib.import_module("tnllm_kernels.lightning_attention")
    original = refuse_block_form_on_cuda()
    try:
        with pytest.raises(RuntimeError, match="took the PyTorch block form"):
            dispatch.lightning_attention_chunk(types.SimpleNamespace(is_cuda=True, shape=(1, 2, 3, 4), dtype="bf16"))
        q = torch.randn(1, 8, 2, 4)           # CPU tensors still go through, with the block form's result
        o, _ = dispatch.lightning_attention(q, q, q, torch.tensor([0.5, 0.25]), None, 4)
        assert torch.allclose(o, original(q, q, q, torch.tensor([0.5, 0.25]), None, 4)[0])
    finally:
        dispatch.lightning_attention_chunk = original


def test_guard_goes_up_only_in_the_benchmarks_runs(monkeypatch):
    """Importing quality_models on a GPU machine leaves the dispatcher alone (the tests import it beside GPU tests that
    run the block form on CUDA on purpose); in a run quality.py starts (its environment variable set) the guard goes
    up."""
    import importlib

    import quality_models
    dispatch = importlib.import_module("tnllm_kernels.lightning_attention")
    original = dispatch.lightning_attention_chunk
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv(quality_models.REFUSE_BLOCK_FORM_ENV, raising=False)
    quality_models.announce_kernels()
    assert dispatch.lightning_attention_chunk is original
    monkeypatch.setenv(quality_models.REFUSE_BLOCK_FORM_ENV, "1")
    try:
        quality_models.announce_kernels()
        assert dispatch.lightning_attention_chunk is not original
    finally:
        dispatch.lightning_attention_chunk = original


def synthetic_data_bin(path: Path, vocab=60):
    """A fairseq data-bin of counting sequences over `vocab` symbols (something learnable), lines ending in </s>."""
    import prepare_corpus
    path.mkdir(parents=True)
    (path / "dict.txt").write_text("".join(f"w{i} 1\n" for i in range(vocab - 4)))
    rng = np.random.default_rng(0)
    for split, lines in (("train", 400), ("valid", 40), ("test", 40)):
        ids = []
        for _ in range(lines):
            start, n = rng.integers(0, vocab - 4), rng.integers(5, 30)
            ids += [4 + (start + i) % (vocab - 4) for i in range(n)] + [prepare_corpus.EOS]
        ids = np.array(ids, dtype=np.uint16)
        ids.tofile(path / f"{split}.bin")
        ends = np.flatnonzero(ids == prepare_corpus.EOS) + 1
        prepare_corpus.write_index(path / f"{split}.idx", np.diff(ends, prepend=0).tolist(), np.uint16)


@pytest.mark.slow
def test_smoke_run_end_to_end(tmp_path):
    src = tmp_path / "src"
    synthetic_data_bin(src)
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "benchmarks" / "quality.py"), "--smoke", "--data", str(src),
           "--work", str(tmp_path / "work"), "--out", str(out), "--only", "llama_lr3e-3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "LLaMA baseline" in proc.stdout                   # both parameter counts printed
    r = json.loads((out / "llama_lr3e-3.json").read_text())
    assert r["model"] == "llama" and "--arch llama_baseline" in r["command"]
    assert "--optimizer torch_adamw" in r["command"] and "--cpu" in r["command"]
    # the curve: validation every 4 updates (and at the saves), against tokens = updates x 4 x 64
    assert [t for t, _ in r["curve"]][:2] == [4 * 256, 5 * 256] and r["curve"][-1][0] == r["tokens"] == 12 * 256
    assert r["curve"][-1][1] < r["curve"][0][1]             # it learns (counting sequences)
    assert set(r["final"]) == {"valid", "test"} and r["final"]["valid"]["loss"] < 6 and r["tokens_per_s"] > 0
    assert (out / "llama_lr3e-3.log").read_text().count("fairseq-validate") == 1
    # the last checkpoint's loss by position, taken before the checkpoint is deleted: every position once
    pos = r["position_loss"]
    assert "error" not in pos, pos.get("error")
    assert [(lo, hi) for lo, hi, _, _ in pos["buckets"]] == list(zip(pos["edges"], pos["edges"][1:]))
    assert pos["edges"][0] == 0 and pos["edges"][-1] == 64 and sum(n for _, _, n, _ in pos["buckets"]) == pos["tokens"]
    assert not list((tmp_path / "work" / "runs" / "llama_lr3e-3" / "ckpt").glob("*.pt"))
    # a finished run is not trained again; --table reads the result
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert again.returncode == 0 and "done before" in again.stdout
    # a fresh machine: no work dir, but the results copied back into the checkout (--done-dir) count as done
    moved = subprocess.run(cmd[:-6] + ["--work", str(tmp_path / "fresh"), "--out", str(tmp_path / "out2"),
                                       "--done-dir", str(out), "--only", "llama_lr3e-3", "--time-limit", "0.01"],
                           capture_output=True, text=True, timeout=300, cwd=REPO)
    assert moved.returncode == 0 and "done before" in moved.stdout, moved.stdout[-2000:] + moved.stderr[-2000:]
    assert json.loads((tmp_path / "out2" / "llama_lr3e-3.json").read_text()) == r
    assert (tmp_path / "out2" / "llama_lr3e-3.log").exists()
    table = subprocess.run([sys.executable, str(REPO / "benchmarks" / "quality.py"), "--smoke", "--out", str(out),
                            "--table"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert "| llama_lr3e-3 | LLaMA baseline (best lr) |" in table.stdout
    assert "Table 1 Transformer: 2.362 / 5.160" in table.stdout
    assert "Valid loss by position in the context" in table.stdout and "| 0-15 |" in table.stdout


def test_leftover_training_of_the_run_is_stopped(tmp_path):
    # a fairseq-train of this run left alive by a killed parent would write the resumed run's checkpoints too
    save_dir = tmp_path / "runs" / "x" / "ckpt"
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)", "fairseq-train"]
    mine = subprocess.Popen(sleeper + ["--save-dir", str(save_dir)])
    other = subprocess.Popen(sleeper + ["--save-dir", str(tmp_path / "other" / "ckpt")])
    try:
        pid_file = tmp_path / "train.pid"
        pid_file.write_text(str(other.pid))
        quality.stop_leftover(pid_file, save_dir)          # another run's training: left alone
        assert other.poll() is None
        pid_file.write_text(str(mine.pid))
        quality.stop_leftover(pid_file, save_dir)
        assert mine.wait(timeout=10) == -9
        quality.stop_leftover(pid_file, save_dir)          # gone already: nothing to do, no error
    finally:
        for p in (mine, other):
            p.kill()
            p.wait()


def test_host_path_is_set_beside_the_own_step_per_run(tmp_path):
    # each main run alone on its device against the step benchmark of its model; runs that shared the GPU are left
    # out (their tokens/s is a share of it)
    (tmp_path / quality.STEP_BENCHMARK).write_text(json.dumps(dict(
        tnl=dict(tokens_per_s=400_000.0, peak_gb=29.7), llama=dict(tokens_per_s=250_000.0, peak_gb=33.0),
        settings=dict(tokens=32768), seq=2048, device="gpu", date="2026-11-29")))
    run = lambda name, model, tps, sharing=1: dict(name=name, model=model, budget="main", tokens_per_s=tps,  # noqa
                                                   date="2026-11-29", runs_sharing_the_device=sharing)
    results = {r["name"]: r for r in (run("tnl_a", "tnl", 360_000.0), run("llama_a", "llama", 200_000.0),
                                      run("llama_b", "llama", 90_000.0, sharing=3))}
    text = "\n".join(quality.host_overhead(results, tmp_path))
    assert "tnl_a (2026-11-29): fairseq-train 360,000 tokens/s = 0.900 x own" in text
    assert "llama_a (2026-11-29): fairseq-train 200,000 tokens/s = 0.800 x own" in text
    assert "llama_b" not in text
    assert quality.host_overhead(results, tmp_path / "elsewhere") == []      # no step benchmark: no lines
