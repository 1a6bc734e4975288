"""Fixtures for tests that run the real Metaseq (``source scripts/ensure_metaseq.sh`` first). Without Metaseq
installed (the main test environment) nothing in this folder is collected.

Session fixtures:
  metaseq_corpus      MetaseqCorpus: a tiny JSONL corpus in Metaseq's streaming layout
                      (root/{train,valid,test}/00/corpus.jsonl) and the byte-level BPE trained on it
                      (vocab.json, merges.txt; <s> <pad> </s> <unk> at ids 0-3, as Metaseq's tasks require).
  metaseq_train       train(save_dir, *extra_args, max_update=20, validate=False, data=None) -> Path of
                      save_dir/checkpoint_last.pt: a real ``metaseq-train`` subprocess of transnormer_llm_tiny on
                      that corpus (or the data directory ``data``, with that BPE), on CPU (extra_args are
                      appended, so later options override the defaults); its output is kept in
                      save_dir/train.log (``train_log_records`` reads its JSON records).
  metaseq_checkpoint  Path of one checkpoint trained that way (20 updates, a few seconds), shared by the session.
metaseq_train_command(corpus, save_dir, ...) is that fixture's command line, for tests that start metaseq-train
themselves (to kill it).
"""
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest

# A real Metaseq, not this folder: with tests/ on sys.path (pytest puts it there for tests/conftest.py) "metaseq"
# also finds this directory as a namespace package (no origin), and collecting these files would then import it and
# make every later `import tnllm_plugin` load the Metaseq adapter.
_spec = importlib.util.find_spec("metaseq")
if _spec is None or _spec.origin in (None, "namespace"):
    collect_ignore_glob = ["test_*.py"]

REPO = Path(__file__).resolve().parents[2]
PLUGIN_DIR = REPO / "tnllm_plugin"
VOCAB_SIZE = 512          # a multiple of 8: Metaseq's dictionary adds no padding symbols
TRAIN_TIMEOUT_S = 300


@dataclass(frozen=True)
class MetaseqCorpus:
    root: Path            # the data directory metaseq-train takes
    vocab: Path           # vocab.json
    merges: Path          # merges.txt


def _documents(n_files=40):
    """Text of a fixed sample of the interpreter's own standard-library modules: real, varied code and prose
    that every machine running the tests has, so no data has to be shipped."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if 2_000 < p.stat().st_size < 60_000)
    random.Random(0).shuffle(files)
    return [p.read_text(encoding="utf-8", errors="replace") for p in files[:n_files]]


@pytest.fixture(scope="session")
def metaseq_corpus(tmp_path_factory) -> MetaseqCorpus:
    from tnllm_plugin.metaseq_data import train_bpe, write_streaming_splits

    root = tmp_path_factory.mktemp("metaseq_corpus")
    docs = _documents()
    splits = {"train": docs[:-6], "valid": docs[-6:-3], "test": docs[-3:]}
    write_streaming_splits(root, splits)
    assert train_bpe(splits["train"], root, VOCAB_SIZE).get_vocab_size() == VOCAB_SIZE
    return MetaseqCorpus(root, root / "vocab.json", root / "merges.txt")


def _metaseq_train_command():
    """metaseq-train of the environment running the tests (beside its python), else the one on PATH."""
    beside = Path(sys.executable).with_name("metaseq-train")
    found = str(beside) if beside.exists() else shutil.which("metaseq-train")
    if found is None:
        pytest.fail("metaseq-train not found: source scripts/ensure_metaseq.sh first")
    return found


def metaseq_train_command(corpus: MetaseqCorpus, save_dir, *extra_args, max_update=20, validate=False, data=None):
    """The metaseq-train command line of the metaseq_train fixture (for tests that run it themselves)."""
    return [_metaseq_train_command(), str(data or corpus.root), "--user-dir", str(PLUGIN_DIR),
            "--task", "streaming_language_modeling", "--vocab-filename", str(corpus.vocab),
            "--merges-filename", str(corpus.merges), "--arch", "transnormer_llm_tiny",
            "--criterion", "transnormer_llm_cross_entropy", "--cpu", "--optimizer", "adam", "--lr", "3e-3",
            "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "5", "--batch-size", "4",
            "--tokens-per-sample", "128", "--max-update", str(max_update), "--num-workers", "0",
            *([] if validate else ["--disable-validation"]), "--ddp-backend", "pytorch_ddp", "--seed", "1",
            "--log-format", "json", "--save-dir", str(save_dir), *map(str, extra_args)]


def train_env():
    # one thread and MKL's strict reproducibility: the resume and kill tests compare weights bit for bit across
    # processes, and with two threads MKL may use fewer when the machine is busy (MKL_DYNAMIC) and pick kernels by
    # memory alignment, which changes the order of a sum: a process now and then computed other step-1 gradients
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MKL_DYNAMIC="FALSE", MKL_CBWR="AUTO,STRICT")


@pytest.fixture(scope="session")
def metaseq_train(metaseq_corpus):
    def train(save_dir, *extra_args, max_update=20, validate=False, data=None):
        save_dir = Path(save_dir)
        cmd = metaseq_train_command(metaseq_corpus, save_dir, *extra_args, max_update=max_update,
                                    validate=validate, data=data)
        env = train_env()
        run = subprocess.run(cmd, cwd=save_dir.parent, env=env, capture_output=True, text=True,
                             timeout=TRAIN_TIMEOUT_S)
        save_dir.mkdir(parents=True, exist_ok=True)
        (save_dir / "train.log").write_text(run.stdout + run.stderr)
        if run.returncode != 0:
            pytest.fail(f"metaseq-train failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        checkpoint = save_dir / "checkpoint_last.pt"
        assert checkpoint.is_file(), f"metaseq-train wrote no {checkpoint}:\n{run.stderr[-2000:]}"
        return checkpoint
    return train


def train_log_records(log_path, kind="train_inner"):
    """The JSON records Metaseq's --log-format json prints as "| KIND | {...}" (train_inner, valid, ...)."""
    marker = f"| {kind} | "
    return [json.loads(line.split(marker, 1)[1]) for line in Path(log_path).read_text().splitlines()
            if marker in line]


@pytest.fixture(scope="session")
def metaseq_checkpoint(tmp_path_factory, metaseq_train) -> Path:
    return metaseq_train(tmp_path_factory.mktemp("metaseq_checkpoint") / "ck")
