"""Bad input to the real Metaseq with the plugin stops early and names its cause: an unknown --arch, a checkpoint
of another architecture, a truncated checkpoint file. (Heads that do not divide the model-parallel size:
test_metaseq_parallel.py.)"""
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import PLUGIN_DIR

SCRIPTS = Path(sys.executable).parent


def fails(name, *args):
    run = subprocess.run([str(SCRIPTS / name), *map(str, args)], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0, f"{name} succeeded:\n{run.stdout[-2000:]}"
    return run.stdout + run.stderr


def task_args(corpus):
    return [corpus.root, "--user-dir", PLUGIN_DIR, "--task", "streaming_language_modeling", "--vocab-filename",
            corpus.vocab, "--merges-filename", corpus.merges, "--cpu", "--batch-size", "4",
            "--tokens-per-sample", "128", "--log-format", "json"]


def test_unknown_arch_is_refused_with_the_known_ones(tmp_path, metaseq_corpus):
    out = fails("metaseq-train", *task_args(metaseq_corpus), "--arch", "transnormer_llm_8b", "--criterion",
                "transnormer_llm_cross_entropy", "--save-dir", tmp_path)
    assert "--arch" in out and "'transnormer_llm_8b'" in out and "transnormer_llm_7b" in out


def test_checkpoint_of_another_architecture_names_the_tensors(tmp_path, metaseq_checkpoint, metaseq_corpus):
    # a 2-layer checkpoint restored into a 3-layer model
    out = fails("metaseq-train", *task_args(metaseq_corpus), "--arch", "transnormer_llm_tiny", "--decoder-layers",
                "3", "--criterion", "transnormer_llm_cross_entropy", "--optimizer", "adam", "--lr", "1e-3",
                "--max-update", "1", "--ddp-backend", "pytorch_ddp", "--num-workers", "0",
                "--restore-file", metaseq_checkpoint, "--save-dir", tmp_path)
    assert "decoder.transnormer.layers.2." in out and "missing" in out, out[-3000:]


def test_truncated_checkpoint_names_the_file(tmp_path, metaseq_checkpoint, metaseq_corpus):
    truncated = tmp_path / "checkpoint_last.pt"
    shutil.copyfile(metaseq_checkpoint, truncated)
    with open(truncated, "r+b") as f:
        f.truncate(truncated.stat().st_size // 2)
    out = fails("metaseq-validate", *task_args(metaseq_corpus), "--path", truncated)
    assert f"{truncated}: not a readable checkpoint" in out, out[-3000:]
