"""Serving a checkpoint of the plugin with Metaseq's ``metaseq-api-local`` (OpenAI-style ``/completions``).

metaseq-api-local takes no command-line arguments: it reads its launch arguments from a constants module named
by ``METASEQ_SERVICE_CONSTANTS_MODULE``. This is such a module, with its values from the environment:

    METASEQ_SERVICE_CONSTANTS_MODULE=tnllm_plugin.metaseq_service TNLLM_SERVE_CHECKPOINT=ck/checkpoint_last.pt \\
        metaseq-api-local

  TNLLM_SERVE_CHECKPOINT   required: a checkpoint file written by ``metaseq-train --user-dir tnllm_plugin``
                           (one file: model-parallel size 1, not FSDP-sharded)
  TNLLM_SERVE_VOCAB        the byte-level BPE's vocab.json  (default: vocab.json beside the checkpoint)
  TNLLM_SERVE_MERGES       its merges.txt                   (default: merges.txt beside the checkpoint)
  TNLLM_SERVE_PORT         default 6010
  TNLLM_SERVE_HOST         the address to listen on, default 127.0.0.1 (this machine only; 0.0.0.0 for all
                           interfaces, Metaseq's own default)
  TNLLM_SERVE_MAX_SEQ_LEN  prompt + completion tokens per request, default 2048 (longer prompts lose their start)
  TNLLM_SERVE_FINAL_VOCAB_SIZE   only if training used --final-vocab-size: the same value

The server runs one process with model-parallel size 1 (the plugin's only size under Metaseq), on the GPU when
there is one and on the CPU otherwise. The values are read when metaseq-api-local asks for them, right at its
start, so a missing or bad setting stops it before any model is loaded, with a message naming the variable;
importing this module reads no setting (``settings(environ)`` returns them all for a given environment).

What Metaseq (f7ffa5f) needed to serve on CPU and to accept a --user-dir whose package (this one) is already
imported is in scripts/metaseq.patch; that torch >= 2.6 loads its pickled checkpoints is metaseq_adapter's
allow-list.
"""
import os
from pathlib import Path

import torch

from . import metaseq_adapter  # noqa: F401  (registers the model, whoever imported Metaseq first)

PLUGIN_DIR = str(Path(__file__).resolve().parent)
DEFAULT_PORT_NUMBER = 6010
_CONSTANTS = ("CHECKPOINT_FOLDER", "HOST", "MAX_SEQ_LEN", "BATCH_SIZE", "MAX_BATCH_TOKENS", "DEFAULT_PORT",
              "MODEL_PARALLEL", "TOTAL_WORLD_SIZE", "MAX_BEAM", "LAUNCH_ARGS", "INFERENCE_ARG_OVERRIDES")


class ServiceConfigError(ValueError):
    pass


def _positive_int(environ, name, default, upper=None):
    raw = environ.get(name, "").strip()
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ServiceConfigError(f"{name}={raw!r}: expected an integer") from None
    if value < 1 or (upper is not None and value > upper):
        raise ServiceConfigError(f"{name}={raw!r}: expected an integer in [1, {upper or 'inf'}]")
    return value


def _file(environ, name, default=None, what=""):
    raw = environ.get(name, "").strip()
    if raw == "" and default is None:
        raise ServiceConfigError(f"{name} is not set: {what}")
    path = Path(raw or default).expanduser().resolve()
    source = f"{name}={raw}" if raw else f"{name} unset, default {path}"
    if not path.is_file():
        raise ServiceConfigError(f"{source}: no such file ({what})")
    # metaseq-api-local splits each launch argument on whitespace
    if any(c.isspace() for c in str(path)):
        raise ServiceConfigError(f"{source}: Metaseq's launcher cannot pass a path containing whitespace")
    return path


def settings(environ=None) -> dict:
    """The constants metaseq-api-local reads (see metaseq/service/constants.py), from ``environ``
    (default os.environ). Raises ServiceConfigError naming the variable at fault."""
    environ = os.environ if environ is None else environ
    checkpoint = _file(environ, "TNLLM_SERVE_CHECKPOINT",
                       what="the checkpoint file (.pt) of metaseq-train --user-dir tnllm_plugin to serve")
    vocab = _file(environ, "TNLLM_SERVE_VOCAB", checkpoint.parent / "vocab.json",
                  what="the byte-level BPE vocab.json the checkpoint was trained with")
    merges = _file(environ, "TNLLM_SERVE_MERGES", checkpoint.parent / "merges.txt",
                   what="the byte-level BPE merges.txt the checkpoint was trained with")
    port = _positive_int(environ, "TNLLM_SERVE_PORT", DEFAULT_PORT_NUMBER, upper=65535)
    host = environ.get("TNLLM_SERVE_HOST", "").strip() or "127.0.0.1"
    max_seq_len = _positive_int(environ, "TNLLM_SERVE_MAX_SEQ_LEN", 2048)
    final_vocab_size = _positive_int(environ, "TNLLM_SERVE_FINAL_VOCAB_SIZE", None)
    batch_size = 64
    launch_args = [
        "--user-dir", PLUGIN_DIR,
        # language_modeling, not the streaming task used for training: only it builds inference batches; at
        # this commit it makes the same dictionary from the same BPE files
        "--task", "language_modeling",
        "--vocab-filename", str(vocab), "--merges-filename", str(merges),
        "--bpe", "hf_byte_bpe", "--bpe-vocab", str(vocab), "--bpe-merges", str(merges),
        "--path", str(checkpoint), "--checkpoint-shard-count", "1",
        "--model-parallel-size", "1", "--distributed-world-size", "1", "--ddp-backend", "pytorch_ddp",
        "--beam", "1", "--batch-size", str(batch_size), "--max-tokens", str(batch_size * max_seq_len),
        "--buffer-size", str(batch_size * max_seq_len),
    ]
    if final_vocab_size is not None:
        launch_args += ["--final-vocab-size", str(final_vocab_size)]
    if not torch.cuda.is_available():
        launch_args.append("--cpu")
    launch_args.append(str(checkpoint.parent))     # the required data argument (the launcher replaces it)
    return {
        "CHECKPOINT_FOLDER": str(checkpoint.parent),   # also the "model" field of each response
        "HOST": host,
        "MAX_SEQ_LEN": max_seq_len,
        "BATCH_SIZE": batch_size,
        "MAX_BATCH_TOKENS": max_seq_len,
        "DEFAULT_PORT": port,
        "MODEL_PARALLEL": 1,
        "TOTAL_WORLD_SIZE": 1,
        "MAX_BEAM": 16,
        # the launcher joins nothing back: it splits each entry on whitespace, so one entry per token is exact
        "LAUNCH_ARGS": launch_args,
        "INFERENCE_ARG_OVERRIDES": {},
    }


def __getattr__(name):
    # PEP 562: the constants are computed from the environment when metaseq-api-local reads them
    if name in _CONSTANTS:
        return settings()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
