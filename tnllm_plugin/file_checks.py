"""Reading checkpoint files so that every refusal names the file (or directory) and the cause, and checking tensors
against the architecture before a model is built. Shared by released_format (the released layout) and
plugin_checkpoint (fairseq-format checkpoints)."""
import contextlib
import json
import re
import zipfile
from pathlib import Path
from typing import Dict, Mapping

import torch

from .checkpoint import RELEASED_PREFIX, check_tensor_shapes, state_dict_to_released
from .model import TransNormerConfig, TransNormerLLM


def read_json(path: Path) -> dict:
    """A JSON object from ``path`` (config.json, an index); a truncated or corrupt file is a ValueError naming it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON, the file is truncated or corrupt ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


@contextlib.contextmanager
def errors_name(source):
    """ValueError / TypeError raised inside (a config value of the wrong type, a tensor that does not fit) come out
    as a ValueError with ``source``, the file or directory being read, in front of the message."""
    try:
        yield
    except (ValueError, TypeError) as e:
        if isinstance(e, ValueError) and str(source) in str(e):     # named already (e.g. by a nested reader)
            raise
        raise ValueError(f"{source}: {e}") from e


@contextlib.contextmanager
def unreadable_names(path: Path):
    """For the decoders of torch.load and safetensors: a truncated or corrupt file makes them raise almost anything
    (RuntimeError, EOFError, UnpicklingError, OSError 22, SafetensorError, UnicodeDecodeError ...) and rarely say
    which file; re-raise as a ValueError that names the file and quotes the decoder's first line."""
    try:
        yield
    except Exception as e:
        first = (str(e).strip().splitlines() or ["no message"])[0][:300]
        raise ValueError(f"{path}: cannot be read, the file is truncated, corrupt or not a checkpoint "
                         f"({type(e).__name__}: {first})") from e


def check_zip_checksums(path: Path) -> None:
    """torch.save's zip format keeps a CRC-32 of every record, which torch.load never checks: a flipped bit in a
    tensor's bytes, or a damaged header that shifts where a tensor is read from, loads as wrong numbers. One pass over
    the file (zlib's CRC runs at GB/s; the pages are then cached for the load) compares them all."""
    with unreadable_names(path), zipfile.ZipFile(path) as z:
        bad = z.testzip()
    if bad is not None:
        raise ValueError(f"{path}: record {bad} fails its CRC-32 check, the file is corrupt")


def check_tensors(cfg: TransNormerConfig, tensors: Mapping[str, torch.Tensor], prefix: str = "") -> None:
    """Names and shapes of ``tensors`` against ``cfg``, naming tensors as the file does: ``prefix`` is
    RELEASED_PREFIX for the released layout (whose lm_head has none), FAIRSEQ_PREFIX for plugin checkpoints."""
    _check_sizes(cfg, {k: tuple(t.shape) for k, t in tensors.items()}, prefix)
    expected = _expected_released_shapes(cfg) if prefix == RELEASED_PREFIX else expected_shapes(cfg, prefix)
    check_tensor_shapes(expected, tensors)


def _check_sizes(cfg: TransNormerConfig, shapes: Mapping[str, tuple], prefix: str) -> None:
    # before any model is built (even on the meta device, LRPE's frequencies and the decay slopes are real
    # tensors): a corrupt size such as 10**12 layers fails here instead of exhausting memory
    layers = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"layers\.(\d+)\.", k))}
    if len(layers) != cfg.n_layers:
        raise ValueError(f"the config says {cfg.n_layers} layers, the weights hold {len(layers)}")
    for name, want in ((f"{prefix}embed_tokens.weight", (cfg.vocab_size, cfg.d_model)),
                       (f"{prefix}layers.0.token_mixer.qkvu_proj.weight", (4 * cfg.hidden_dim, cfg.d_model))):
        if name in shapes and tuple(shapes[name]) != want:
            raise ValueError(f"{name}: checkpoint {tuple(shapes[name])} vs config {want}")


def is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def expected_shapes(cfg: TransNormerConfig, prefix: str = "") -> Dict[str, tuple]:
    """Names and shapes of the model's state dict, from a model on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = TransNormerLLM(cfg)
    return {prefix + k: tuple(v.shape) for k, v in model.state_dict().items()}


def _expected_released_shapes(cfg: TransNormerConfig) -> Dict[str, tuple]:
    shapes = expected_shapes(cfg)
    renamed = state_dict_to_released({k: k for k in shapes})
    return {new: shapes[old] for new, old in renamed.items()}
