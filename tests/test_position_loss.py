"""benchmarks/position_loss.py on CPU: two tiny checkpoints written by fairseq-train (one update each, on the
synthetic data-bin of test_quality), loaded as position_loss loads them. Checked: the buckets cover every position
once; their token-weighted mean is the overall mean and equals the loss computed independently from the model's
logits; and the loss at position p of a sample is the loss of the model run on that sample's first p + 1 tokens
alone (the positions are the sample's, and nothing later leaks in)."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import position_loss  # noqa: E402
from test_quality import synthetic_data_bin  # noqa: E402

SEQ = 32
MODELS = {
    "tnl": ["--arch", "transnormer_llm_385m", "--decoder-embed-dim", "32", "--decoder-layers", "2",
            "--decoder-attention-heads", "4", "--hidden-dim", "32", "--glu-dim", "48"],
    "llama": ["--arch", "llama_baseline", "--decoder-embed-dim", "32", "--decoder-layers", "2",
              "--decoder-attention-heads", "4", "--decoder-ffn-embed-dim", "48"],
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("position_loss")
    data = tmp / "data"
    synthetic_data_bin(data)
    exe = Path(sys.executable).parent / "fairseq-train"
    paths, procs = {}, {}
    for name, flags in MODELS.items():
        save = tmp / name
        cmd = [str(exe) if exe.exists() else "fairseq-train", str(data), "--user-dir",
               str(REPO / "benchmarks" / "quality_models"), "--task", "language_modeling", "--sample-break-mode",
               "none", "--tokens-per-sample", str(SEQ), "--batch-size", "4", *flags,
               "--criterion", "transnormer_llm_cross_entropy", "--optimizer", "torch_adamw", "--lr", "1e-3",
               "--max-update", "1", "--save-dir", str(save), "--no-epoch-checkpoints", "--cpu", "--seed", "1",
               "--num-workers", "0", "--disable-validation", "--no-progress-bar"]
        # both at once: most of a one-update run is fairseq's start-up
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        paths[name] = save / "checkpoint_last.pt"
    for proc in procs.values():
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out[-3000:]
    return data, paths


def test_bucket_edges():
    assert position_loss.bucket_edges(2048) == [0, 16, 64, 256, 1024, 2048]
    assert position_loss.bucket_edges(512) == [0, 16, 64, 256, 512]
    assert position_loss.bucket_edges(16) == [0, 16]


@pytest.mark.parametrize("name", list(MODELS))
def test_buckets_add_up_to_the_plain_loss(trained, name):
    data, paths = trained
    model, task, criterion = position_loss.load(paths[name], data, REPO / "benchmarks" / "quality_models")
    edges = [0, 3, 10, SEQ]
    r = position_loss.position_losses(model, criterion, task, "valid", batch_size=4, edges=edges)
    # every position in exactly one bucket, every non-padding target counted once
    assert [(lo, hi) for lo, hi, _, _ in r["buckets"]] == [(0, 3), (3, 10), (10, SEQ)]
    samples = list(position_loss.batches(task, "valid", 4))
    pad = task.target_dictionary.pad()
    targets = sum(int(s["target"].ne(pad).sum()) for s in samples)
    assert sum(n for _, _, n, _ in r["buckets"]) == r["tokens"] == targets
    assert any(s["target"].eq(pad).any() for s in samples)   # the split's last sample is short: padding left out
    weighted = sum(n * bits for _, _, n, bits in r["buckets"]) / r["tokens"]
    assert weighted == pytest.approx(r["overall"], rel=1e-9)
    # independently: fairseq's plain loss from the logits (TransNormerLLM's criterion takes the chunked LM head)
    with torch.no_grad():
        nll = sum(F.cross_entropy(model(**s["net_input"])[0].flatten(0, 1).float(), s["target"].flatten(),
                                  ignore_index=pad, reduction="sum").item() for s in samples)
    assert r["overall"] == pytest.approx(nll / targets / math.log(2), rel=1e-5)
    assert 2 < r["overall"] < 8                        # near log2(60) after one update: a real loss, not 0 or nan


@pytest.mark.parametrize("name", list(MODELS))
def test_position_p_is_the_loss_with_p_plus_one_tokens_of_context(trained, name):
    data, paths = trained
    model, task, criterion = position_loss.load(paths[name], data, REPO / "benchmarks" / "quality_models")
    r = position_loss.position_losses(model, criterion, task, "valid", batch_size=1, max_batches=3)
    assert r["samples"] == 3 and r["edges"] == [0, 16, SEQ]
    sample = list(position_loss.batches(task, "valid", 1, max_batches=3))[2]     # one whole sample
    source, target = sample["net_input"]["src_tokens"], sample["target"]
    assert target.shape == (1, SEQ) and target.ne(task.target_dictionary.pad()).all()
    per_sample = position_loss.position_sums(model, criterion, [sample], SEQ)[0] / math.log(2)
    with torch.no_grad():
        for p in (0, 7, SEQ - 1):
            logits = model(source[:, :p + 1], src_lengths=torch.tensor([p + 1]))[0][0, -1].float()
            alone = F.cross_entropy(logits, target[0, p]).item() / math.log(2)
            assert per_sample[p].item() == pytest.approx(alone, rel=1e-4, abs=1e-5), p


def test_names_must_match_the_checkpoints(tmp_path):
    with pytest.raises(SystemExit, match="--names gives 1 names for 2 --path checkpoints"):
        position_loss.main(["--path", "a.pt,b.pt", "--names", "only", "--data", str(tmp_path)])
