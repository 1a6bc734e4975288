"""Convert between the released checkpoints (OpenNLPLab's Hugging Face layout) and this plugin's checkpoints,
and load either into a plain ``TransNormerLLM`` without a training host.

Formats
  released   a directory: ``config.json`` plus the weights as ``pytorch_model.bin`` or ``model.safetensors``,
             or shards listed by ``pytorch_model.bin.index.json`` / ``model.safetensors.index.json``
             (``weight_map``: tensor name -> shard file). Names as in the spec ("Released checkpoint layout").
  plugin     a fairseq checkpoint file (``checkpoint.pt``): a dict with ``cfg`` (task ``language_modeling``,
             model ``transnormer_llm`` with the architecture arguments), ``model`` (names
             ``decoder.transnormer.<plugin name>``) and the bookkeeping entries fairseq's checkpoint_utils
             expects; beside it ``dict.txt`` (for fairseq's language_modeling task) and
             ``released_config.json`` (the source config, verbatim). fairseq-train's own checkpoints
             (e.g. the quickstart's checkpoint_best.pt) are plugin checkpoints too.

Conversion renames tensors and never touches their bytes: released -> plugin -> released gives the same
names, shapes, dtypes and bytes, and the same config.json keys (keys this module does not interpret are kept).

Vocabulary and special ids
  Token id k is embedding row k and logit k in every format: rows are never permuted, so logits are unchanged
  and the released tokenizer's ids can be fed as they are. fairseq's language_modeling task builds its
  Dictionary from dict.txt after adding its own four specials (<s>=0, <pad>=1, </s>=2, <unk>=3), so the
  written dict.txt lists vocab_size - 4 symbols, for ids 4 .. vocab_size-1, and len(dictionary) == vocab_size.
  The symbols are the decimal ids themselves ("4", "5", ...), so text of space-separated released ids
  binarizes (fairseq-preprocess --srcdict dict.txt) to those same ids; a dict.txt found beside the source
  (e.g. one written by plugin-to-released) is reused instead.
  With the released ids pad 0 / bos 1 / eos 2, fairseq's eos (2) is the released eos: the separator fairseq
  appends to every line and the token its generator stops at. fairseq's <s> (0) and <pad> (1) name the
  released pad and bos rows, and <unk> (3) the released id 3. Inside fairseq this means: batches are padded
  with id 1 (harmless for a causal model with right padding), the criterion ignores targets equal to 1 and
  fine-tuning leaves embedding row 1 untrained (fairseq's padding_idx); do not use --add-bos-token (it would
  prepend id 0, the released pad). Swapping rows 0 and 1 instead would make fairseq's names right but every
  released id and logit column 0/1 wrong, for every user outside fairseq.
  The released ids are carried in the checkpoint (entry ``tnllm``) and in released_config.json, returned
  by ``load_model`` and written back by ``plugin_to_released``. A checkpoint fairseq-train wrote from its own
  dict.txt has fairseq's ids (bos 0, pad 1, eos 2, unk 3), and that is what its info and config.json say.

CLI: ``python examples/convert_checkpoint.py`` (or ``python -m tnllm_plugin.convert``) -h.
Nothing here imports fairseq at module level: ``load_model`` works without it; writing a plugin checkpoint
uses fairseq's own argument parser when fairseq is installed (a complete cfg, as fairseq-train writes), and a
smaller cfg that checkpoint_utils.load_model_ensemble_and_task also accepts when it is not.
"""
import argparse
import collections
import contextlib
import fnmatch
import json
import os
import re
import shutil
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .checkpoint import (RELEASED_PREFIX, check_tensor_shapes, check_tensor_values, config_from_released,
                         config_to_released, state_dict_from_released, state_dict_to_released)
from .model import TransNormerConfig, TransNormerLLM
from .presets import PRESETS

PLUGIN_DIR = Path(__file__).resolve().parent
CONFIG_NAME = "config.json"
WEIGHTS_NAME = {"bin": "pytorch_model.bin", "safetensors": "model.safetensors"}
INDEX_NAME = {"bin": "pytorch_model.bin.index.json", "safetensors": "model.safetensors.index.json"}
SHARD_PATTERN = {"bin": "pytorch_model-*-of-*.bin", "safetensors": "model-*-of-*.safetensors"}
# Hugging Face's preference when a directory holds several layouts
READ_ORDER = [("safetensors", False), ("safetensors", True), ("bin", False), ("bin", True)]
PLUGIN_CHECKPOINT_NAME = "checkpoint.pt"
DICT_NAME = "dict.txt"
RELEASED_CONFIG_COPY = "released_config.json"
FAIRSEQ_PREFIX = "decoder.transnormer."
FAIRSEQ_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")         # fairseq Dictionary ids 0, 1, 2, 3
FAIRSEQ_IDS = {"bos_id": 0, "pad_id": 1, "eos_id": 2, "unk_id": 3}
METADATA_KEY = "tnllm"
METADATA_VERSION = 1
# tokenizer and generation files that travel with the weights (copied verbatim)
COMPANION_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "generation_config.json",
                      "*.model", "vocab.json", "vocab.txt", "merges.txt")

# --- what config.json keys mean -----------------------------------------------------------------------------
# Interpreted by config_from_released: they define the architecture and the special ids.
ARCHITECTURE_KEYS = {"vocab_size", "decoder_embed_dim", "decoder_layers", "decoder_attention_heads", "hidden_dim",
                     "glu_dim", "linear_use_lrpe_list", "linear_act_fun", "norm_type", "no_scale_embedding", "bias",
                     "init_std", "pad_token_id", "bos_token_id", "eos_token_id"}
# Known not to change what the model computes (Hugging Face bookkeeping, tokenizer and generation settings).
INERT_KEYS = {"model_type", "architectures", "auto_map", "torch_dtype", "transformers_version", "use_cache",
              "add_bos_token", "unk_token_id", "_name_or_path", "tokenizer_class", "output_attentions",
              "output_hidden_states", "return_dict", "use_return_dict", "max_length", "min_length", "do_sample",
              "num_beams", "temperature", "top_k", "top_p", "repetition_penalty", "is_decoder",
              "is_encoder_decoder", "torchscript", "use_bfloat16", "chunk_size_feed_forward", "problem_type",
              "decoder_start_token_id", "sep_token_id", "glu_act"}
# Keys that change the architecture in a way the plugin does not implement, with the values it can honour.
UNSUPPORTED_VALUES = {
    "model_type": ({"transnormer"}, "not a TransNormerLLM checkpoint"),
    "tie_word_embeddings": ({False}, "the plugin's LM head is untied, as in the released checkpoints"),
    "kv_heads": ({-1, None}, "grouped key/value heads are not implemented"),
}
# Unknown keys whose names say they size or shape the network: an error rather than a silent difference.
ARCHITECTURAL_WORDS = ("dim", "layers", "heads", "vocab", "expert", "rope", "window", "decay", "lrpe", "tie_",
                       "intermediate", "num_hidden")


@dataclass
class ReleasedCheckpoint:
    config: dict                      # config.json as read (every key, in file order)
    model_config: TransNormerConfig   # what config.json says, interpreted
    unknown_keys: List[str]           # config.json keys kept but not interpreted
    tensors: Dict[str, torch.Tensor]  # released names, file order; checked against model_config
    weight_files: List[Path]
    layout: str                       # e.g. "safetensors, 3 shards (model.safetensors.index.json)"
    directory: Path


@dataclass
class CheckpointInfo:
    """What ``load_model`` returns beside the model. Special ids are those of the vocabulary the weights were
    trained with (see the module docstring); ``dict_path`` is a dict.txt beside the checkpoint (or in its
    fairseq data directory) whose size matches the vocabulary, else None."""
    path: str
    format: str                        # "released" or "plugin" (fairseq-format)
    config: TransNormerConfig
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    unk_id: Optional[int] = None
    dict_path: Optional[str] = None
    released_config: Optional[dict] = None
    unknown_config_keys: List[str] = field(default_factory=list)
    dtype: Optional[torch.dtype] = None

    def __getitem__(self, key):      # info["vocab_size"] works as well as info.vocab_size
        return getattr(self, key)


# =============================================================================================================
# config.json

def interpret_released_config(hf: Mapping, allowed_keys=()) -> Tuple[TransNormerConfig, List[str]]:
    """config.json -> (TransNormerConfig, keys kept but not interpreted). Raises for keys that would change the
    architecture in a way the plugin cannot honour; ``allowed_keys`` declares further keys harmless."""
    problems = []
    for key, (accepted, why) in UNSUPPORTED_VALUES.items():
        if key in hf and hf[key] not in accepted:
            problems.append(f"{key}={hf[key]!r}: {why}")
    known = ARCHITECTURE_KEYS | INERT_KEYS | set(UNSUPPORTED_VALUES) | set(allowed_keys)
    unknown = [k for k in hf if k not in known]
    for key in unknown:
        if any(word in key.lower() for word in ARCHITECTURAL_WORDS):
            problems.append(f"{key}={hf[key]!r}: an unknown key that looks architectural (the plugin would "
                            f"ignore it and compute a different model; declare it harmless to convert anyway)")
    if problems:
        raise ValueError("; ".join(problems))
    if unknown:
        warnings.warn(f"config.json keys kept but not interpreted: {unknown}", stacklevel=3)
    return config_from_released(hf), unknown


def released_config_for(cfg: TransNormerConfig, original: Optional[Mapping], dtype: Optional[torch.dtype]) -> dict:
    """config.json for ``cfg``: the original file verbatim when it still describes the model (lossless round
    trip), else the original's other keys with the architecture keys of ``cfg``."""
    derived = config_to_released(cfg)
    dtype_name = None if dtype is None else str(dtype).replace("torch.", "")
    if original is None:
        return {**derived, "torch_dtype": dtype_name} if dtype_name else derived
    config = dict(original) if _same_architecture(config_from_released(original), cfg) else {**original, **derived}
    if "torch_dtype" in config and dtype_name:   # e.g. bf16 weights fine-tuned and saved in fp32
        config["torch_dtype"] = dtype_name
    return config


def _same_architecture(a: TransNormerConfig, b: TransNormerConfig) -> bool:
    ignored = ("dropout", "block_size")     # runtime settings, not stored in config.json
    return all(getattr(a, f) == getattr(b, f) for f in a.__dataclass_fields__ if f not in ignored)


# =============================================================================================================
# Reading files: every refusal names the file (or directory) and the cause

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
    expected = _expected_released_shapes(cfg) if prefix == RELEASED_PREFIX else _expected_shapes(cfg, prefix)
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


# =============================================================================================================
# Reading the released layout

def read_released(src, allowed_keys=()) -> ReleasedCheckpoint:
    """Read config.json and every tensor of a released checkpoint directory (single file or shards), and check
    the tensors' names and shapes against the architecture config.json describes."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"released checkpoint directory not found: {src}")
    config_path = src / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{src}: no {CONFIG_NAME} (not a released checkpoint directory)")
    config = read_json(config_path)
    with errors_name(config_path):
        model_config, unknown = interpret_released_config(config, allowed_keys)    # fail before reading weights
    fmt, sharded = _find_layout(src)
    if sharded:
        tensors, files = _read_sharded(src / INDEX_NAME[fmt])
        layout = f"{fmt}, {len(files)} shards ({INDEX_NAME[fmt]})"
    else:
        path = src / WEIGHTS_NAME[fmt]
        tensors, files = load_weight_file(path), [path]
        layout = f"{fmt}, single file ({path.name})"
    with errors_name(f"{src} ({layout}) against {CONFIG_NAME}"):
        check_tensors(model_config, tensors, RELEASED_PREFIX)
    return ReleasedCheckpoint(config, model_config, unknown, tensors, files, layout, src)


def _find_layout(src: Path) -> Tuple[str, bool]:
    for fmt, sharded in READ_ORDER:
        if (src / (INDEX_NAME[fmt] if sharded else WEIGHTS_NAME[fmt])).is_file():
            return fmt, sharded
    wanted = [WEIGHTS_NAME["bin"], WEIGHTS_NAME["safetensors"], INDEX_NAME["bin"], INDEX_NAME["safetensors"]]
    raise FileNotFoundError(f"{src}: no weights found; expected one of {wanted}")


def load_weight_file(path) -> Dict[str, torch.Tensor]:
    """One .bin (torch.save of a state dict, loaded with weights_only) or .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    with unreadable_names(path):
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:   # memory-mapped (a 7B checkpoint is not read twice into memory), except files in torch's legacy
            # (non-zip) format, which cannot be mapped
            if _is_zip(path):
                check_zip_checksums(path)
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    if not isinstance(sd, Mapping) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(sd).__name__}")
    with errors_name(path):
        check_tensor_values(sd)
    return dict(sd)


def _read_sharded(index_path: Path) -> Tuple[Dict[str, torch.Tensor], List[Path]]:
    weight_map = _read_index(index_path)
    by_file: Dict[str, List[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, []).append(name)
    missing = [f for f in by_file if not (index_path.parent / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{index_path.name} names shard files that do not exist in {index_path.parent}: "
                                + ", ".join(f"{f} (for {len(by_file[f])} tensors, e.g. {by_file[f][0]})"
                                            for f in missing))
    tensors: Dict[str, torch.Tensor] = {}
    files = []
    for file, names in by_file.items():
        shard = load_weight_file(index_path.parent / file)
        not_listed = sorted(set(shard) - set(names))
        absent = sorted(set(names) - set(shard))
        if not_listed or absent:
            problems = ([f"in the shard but mapped elsewhere or not at all: {not_listed}"] if not_listed else []) \
                + ([f"mapped to it but absent: {absent}"] if absent else [])
            raise ValueError(f"{index_path.parent / file}: the shard does not match {index_path.name}: "
                             + "; ".join(problems))
        tensors.update((n, shard[n]) for n in names)
        files.append(index_path.parent / file)
    return tensors, files


def _read_index(index_path: Path) -> Dict[str, str]:
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path}: no 'weight_map' (tensor name -> shard file)")
    bad = [n for n, f in weight_map.items() if not isinstance(f, str) or Path(f).name != f]
    if bad:
        raise ValueError(f"{index_path}: weight_map entries must be file names in the same directory: {bad[:5]}")
    return weight_map


# =============================================================================================================
# Writing the released layout

def parse_size(text) -> int:
    """'2GB' -> 2e9 bytes, '2GiB' -> 2 * 2^30, '500MB', '64KiB', '1000' (bytes): Hugging Face's convention."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40,
             "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12, "B": 1}
    for unit, factor in units.items():     # longest suffixes first
        if s.endswith(unit):
            number = s[: -len(unit)]
            break
    else:
        number, factor = s, 1
    try:
        size = int(float(number) * factor)
    except ValueError:
        raise ValueError(f"cannot read size {text!r}; examples: 2GB, 500MB, 2GiB, 1000000") from None
    if size <= 0:
        raise ValueError(f"shard size must be positive, got {text!r}")
    return size


def plan_shards(tensors: Mapping[str, torch.Tensor], max_bytes: Optional[int]) -> List[List[str]]:
    """Names grouped into shards of at most ``max_bytes`` each, in order (a larger tensor gets a shard alone)."""
    if max_bytes is None:
        return [list(tensors)]
    shards, current, size = [], [], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def write_released(out_dir, config: Mapping, tensors: Mapping[str, torch.Tensor], safetensors: bool = False,
                   max_shard_size=None, overwrite: bool = False) -> List[Path]:
    """config.json and the weights: one file, or shards plus an index when they exceed ``max_shard_size``."""
    out = Path(out_dir)
    stale = _released_files_in(out, overwrite)
    with StagedOutput(out, stale, last=CONFIG_NAME) as stage:
        _stage_released(stage.path, config, tensors, safetensors, max_shard_size)
    return stage.written


def _stage_released(stage: Path, config: Mapping, tensors: Mapping[str, torch.Tensor], safetensors: bool,
                    max_shard_size) -> None:
    fmt = "safetensors" if safetensors else "bin"
    shards = plan_shards(tensors, None if max_shard_size is None else parse_size(max_shard_size))
    if len(shards) == 1:
        _save_weights(stage / WEIGHTS_NAME[fmt], tensors, fmt)
    else:
        weight_map = {}
        stem, ext = WEIGHTS_NAME[fmt].rsplit(".", 1)     # Hugging Face's shard names
        for i, names in enumerate(shards, start=1):
            file = f"{stem}-{i:05d}-of-{len(shards):05d}.{ext}"
            _save_weights(stage / file, {n: tensors[n] for n in names}, fmt)
            weight_map.update((n, file) for n in names)
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (stage / INDEX_NAME[fmt]).write_text(json.dumps(index, indent=2) + "\n")
    (stage / CONFIG_NAME).write_text(json.dumps(dict(config), indent=2) + "\n")


def _released_files_in(out: Path, overwrite: bool) -> List[Path]:
    """The released-layout files already in ``out`` (to be replaced: stale shards of another layout would confuse
    readers); an error unless ``overwrite``."""
    patterns = [CONFIG_NAME, *WEIGHTS_NAME.values(), *INDEX_NAME.values(), *SHARD_PATTERN.values()]
    existing = sorted({p for pattern in patterns for p in out.glob(pattern)})
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds {[p.name for p in existing]}; choose another directory "
                              f"or overwrite (stale shards of another layout would confuse readers)")
    return existing


class StagedOutput:
    """A staging folder inside ``out`` (``.path``) that a conversion writes its files into. Only when the ``with``
    body has written them all are the ``stale`` files removed and the staged files moved into ``out`` (``last``,
    the file that makes the directory a checkpoint, moved last; each move is a rename within one filesystem), so a
    conversion that fails (a full disk, a bad tensor) leaves ``out`` as it was, and one killed meanwhile leaves at
    most the hidden staging folder. ``written``: the final paths."""

    def __init__(self, out: Path, stale=(), last: Optional[str] = None):
        self.out, self.stale, self.last = Path(out), list(stale), last
        self.written: List[Path] = []

    def __enter__(self) -> "StagedOutput":
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=".converting-", dir=self.out))
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                files = sorted(self.path.iterdir(), key=lambda p: p.name == self.last)
                for p in self.stale:
                    if not (self.path / p.name).exists():
                        p.unlink()
                for p in files:
                    os.replace(p, self.out / p.name)
                    self.written.append(self.out / p.name)
        finally:
            shutil.rmtree(self.path, ignore_errors=True)


def _save_weights(path: Path, tensors: Mapping[str, torch.Tensor], fmt: str) -> Path:
    # a view into a larger storage would drag the whole storage into the file: save it on its own storage
    own = {n: (t if _owns_storage(t) else t.clone()) for n, t in tensors.items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(own, str(path), metadata={"format": "pt"})
    else:
        torch.save(own, path)
    return path


def _owns_storage(t: torch.Tensor) -> bool:
    nbytes = t.numel() * t.element_size()
    return t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == nbytes


# =============================================================================================================
# Plugin (fairseq-format) checkpoints

def fairseq_model_args(cfg: TransNormerConfig) -> dict:
    """The ``transnormer_llm`` arguments that rebuild ``cfg`` (fairseq_adapter.config_from_args reads them)."""
    return {
        "decoder_embed_dim": cfg.d_model, "decoder_layers": cfg.n_layers, "decoder_attention_heads": cfg.n_heads,
        "hidden_dim": cfg.hidden_dim, "glu_dim": cfg.glu_dim,
        # "," is the adapter's spelling of "no LRPE layer" (an empty string would fall back to the default "0")
        "lrpe_layers": ",".join(str(i) for i in cfg.lrpe_layers) or ",",
        "decay_schedule": cfg.decay, "qk_act": cfg.qk_act, "norm_type": cfg.norm, "bias": cfg.bias,
        "no_scale_embedding": cfg.no_scale_embedding, "dropout": cfg.dropout, "init_std": cfg.init_std,
    }


def model_arg_flags(cfg: TransNormerConfig) -> List[str]:
    """fairseq_model_args(cfg) as command-line flags (both hosts' parsers take them)."""
    argv = []
    for key, value in fairseq_model_args(cfg).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv += [flag] if value else []
        else:
            argv += [flag, repr(value) if isinstance(value, float) else str(value)]
    return argv


def fairseq_arch_name(cfg: TransNormerConfig) -> str:
    """fairseq knows transnormer_llm's architectures by their presets only. Every architecture argument is
    written explicitly (a preset fills only missing ones), so the preset just names it: the one of the same
    shape, else the tiny one."""
    for name, shape in PRESETS.items():
        if all(getattr(cfg, k) == v for k, v in shape.items()):
            return f"transnormer_llm_{name}"
    return "transnormer_llm_tiny"


def _check_arch(path, args: Mapping):
    arch = args.get("arch") or args.get("_name")
    if arch is not None and not str(arch).startswith("transnormer_llm"):
        raise ValueError(f"{path}: not a transnormer_llm checkpoint: its architecture is {arch!r}")


def config_from_fairseq_args(args: Mapping, vocab_size: int, special_ids: Mapping[str, int]) -> TransNormerConfig:
    """A fairseq checkpoint's model arguments (as a dict) -> TransNormerConfig, without fairseq."""
    _check_arch("model arguments", args)
    missing = [k for k in ("decoder_embed_dim", "decoder_layers", "decoder_attention_heads", "glu_dim")
               if args.get(k) is None]
    if missing:
        raise ValueError(f"the checkpoint's model arguments lack {missing}")
    d_model = int(args["decoder_embed_dim"])
    lrpe = str(args.get("lrpe_layers") or "0")        # as the adapter's base_architecture: empty means "0"
    return TransNormerConfig(
        vocab_size=vocab_size, d_model=d_model, n_layers=int(args["decoder_layers"]),
        n_heads=int(args["decoder_attention_heads"]), hidden_dim=int(args.get("hidden_dim") or d_model),
        glu_dim=int(args["glu_dim"]), lrpe_layers=tuple(int(i) for i in lrpe.split(",") if i.strip()),
        decay=args.get("decay_schedule") or "released", qk_act=args.get("qk_act") or "silu",
        norm=args.get("norm_type") or "srms", bias=bool(args.get("bias", False)),
        no_scale_embedding=bool(args.get("no_scale_embedding", False)), dropout=float(args.get("dropout") or 0.0),
        init_std=float(args.get("init_std") or 0.02),
        pad_id=special_ids["pad_id"], bos_id=special_ids["bos_id"], eos_id=special_ids["eos_id"])


def fairseq_cfg(cfg: TransNormerConfig, data_dir: str, use_fairseq: Optional[bool] = None) -> dict:
    """The ``cfg`` entry of a fairseq checkpoint for ``cfg``. With fairseq installed (or ``use_fairseq``): built
    by fairseq's own training parser from the command line fairseq-train would get, so every section exists
    (hub from_pretrained, fairseq-generate need them). Without: the sections checkpoint_utils needs to build the
    task and the model (``task``, ``model``, ``criterion``, ``common.user_dir``)."""
    args = fairseq_model_args(cfg)
    if use_fairseq is None:
        use_fairseq = _fairseq_available()
    if not use_fairseq:
        arch = fairseq_arch_name(cfg)
        model = argparse.Namespace(_name=arch, arch=arch, **args)
        return {"_name": None, "common": {"user_dir": str(PLUGIN_DIR)},
                "task": {"_name": "language_modeling", "data": data_dir},
                "model": model, "criterion": {"_name": "transnormer_llm_cross_entropy"}}
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from omegaconf import OmegaConf

    from . import fairseq_adapter  # noqa: F401  (registers transnormer_llm)
    # no --user-dir on this command line: the plugin is registered already, and fairseq's import_user_module
    # refuses a package imported through a differently spelled path; the cfg records it afterwards
    argv = [data_dir, "--task", "language_modeling", "--arch", fairseq_arch_name(cfg),
            "--criterion", "transnormer_llm_cross_entropy", *model_arg_flags(cfg)]
    with warnings.catch_warnings():      # hydra's deprecation notices about fairseq's own config use
        warnings.simplefilter("ignore")
        parsed = options.parse_args_and_arch(options.get_training_parser(), argv)
        parsed.user_dir = str(PLUGIN_DIR)
        return OmegaConf.to_container(convert_namespace_to_omegaconf(parsed), resolve=True, enum_to_str=True)


def _fairseq_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("fairseq") is not None


def plugin_checkpoint_state(cfg: TransNormerConfig, tensors: Mapping[str, torch.Tensor], data_dir: str,
                            released_config: Optional[Mapping] = None, use_fairseq: Optional[bool] = None,
                            host_cfg: Optional[dict] = None) -> dict:
    """The dict torch.save writes as a plugin checkpoint; ``tensors`` have plugin names (no prefix). Its ``cfg``
    is fairseq's (fairseq_cfg) unless ``host_cfg`` gives another host's (metaseq_checkpoint.metaseq_cfg)."""
    return {
        "args": None,
        "cfg": host_cfg if host_cfg is not None else fairseq_cfg(cfg, data_dir, use_fairseq),
        "model": {FAIRSEQ_PREFIX + k: v for k, v in tensors.items()},
        # the bookkeeping checkpoint_utils._upgrade_state_dict reads: a checkpoint no optimizer has touched
        "optimizer_history": [{"criterion_name": "TransNormerCrossEntropy", "optimizer_name": "none",
                               "lr_scheduler_state": {}, "num_updates": 0}],
        "extra_state": {"train_iterator": {"epoch": 1, "iterations_in_epoch": 0}},
        "last_optimizer_state": None,
        METADATA_KEY: {"version": METADATA_VERSION, "vocab_size": cfg.vocab_size,
                       "special_ids": {"pad_id": cfg.pad_id, "bos_id": cfg.bos_id, "eos_id": cfg.eos_id},
                       "released_config": None if released_config is None else dict(released_config)},
    }


def write_fairseq_dict(path, vocab_size: int) -> Path:
    """dict.txt for fairseq's Dictionary: symbols for ids 4 .. vocab_size-1 (fairseq adds its 4 specials)."""
    if vocab_size <= len(FAIRSEQ_SPECIALS):
        raise ValueError(f"vocab_size {vocab_size} leaves no room beside fairseq's {len(FAIRSEQ_SPECIALS)} specials")
    lines = [f"{i} 1" for i in range(len(FAIRSEQ_SPECIALS), vocab_size)]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def fairseq_dict_size(path) -> int:
    """len(fairseq Dictionary) that a dict.txt gives: its symbol lines plus the 4 specials."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text, the file is corrupt ({e})") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return len(lines) + len(FAIRSEQ_SPECIALS)


def _is_placeholder_dict(path) -> bool:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return all(ln.split(" ")[0] == str(i) for i, ln in enumerate(lines, start=len(FAIRSEQ_SPECIALS)) if ln.strip())


# --- reading plugin checkpoints without fairseq ---------------------------------------------------------------

class _Unpickled(dict):
    """Stands in for a fairseq / omegaconf class met while unpickling a checkpoint with weights_only=True:
    keeps what pickle hands it (constructor arguments, items, state) and runs no code of that class."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.pickled_args = args

    def __setstate__(self, state):
        self.pickled_state = state


# Modules whose classes fairseq and Metaseq checkpoints pickle (configs, meters, Metaseq's data iterator
# position); never imported here, only stood in for.
STAND_IN_MODULES = ("fairseq", "metaseq", "omegaconf", "typing", "enum")
# Harmless to construct: what omegaconf's pickles use beside their own classes (e.g. defaultdict(list)).
REAL_GLOBALS = {f"{t.__module__}.{t.__qualname__}": t for t in (
    argparse.Namespace, collections.OrderedDict, collections.defaultdict, int, float, str, bool, bytes, list, dict,
    tuple, set, frozenset)}


def load_fairseq_file(path, trusted: bool = False) -> dict:
    """torch.load a fairseq checkpoint. By default with weights_only=True: argparse.Namespace is allowed, the
    classes of fairseq and omegaconf are replaced by inert stand-ins, anything else is refused. ``trusted``
    unpickles everything (weights_only=False): only for files you made yourself."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if trusted:
        with unreadable_names(path):
            return torch.load(path, map_location="cpu", weights_only=False)
    if not _is_zip(path):       # legacy (non-zip) file: weights_only loading below says what it refuses
        unsafe = []
    else:
        check_zip_checksums(path)
        with unreadable_names(path):
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    allowed, refused = [], []
    for name in unsafe:
        if name in REAL_GLOBALS:
            allowed.append(REAL_GLOBALS[name])
        elif name.split(".")[0] in STAND_IN_MODULES:
            allowed.append((_Unpickled, name))
        else:
            refused.append(name)
    if refused:
        raise ValueError(f"{path}: refusing to unpickle {refused} with weights_only=True; if you trust this file, "
                         f"load it with trusted=True (--trust-checkpoint)")
    with torch.serialization.safe_globals(allowed), unreadable_names(path):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))


def _omegaconf_state(obj) -> Optional[dict]:
    if isinstance(obj, _Unpickled):
        state = getattr(obj, "pickled_state", None)
        if isinstance(state, tuple) and len(state) == 2:      # (dict state, slot state)
            state = state[0]
        return state if isinstance(state, dict) else {}
    if type(obj).__module__.split(".")[0] == "omegaconf" and hasattr(obj, "__dict__"):
        return vars(obj)
    return None


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def plain(obj):
    """Namespaces and omegaconf containers (real, or stood in for) -> dicts and lists, recursively."""
    if isinstance(obj, argparse.Namespace):
        return {k: plain(v) for k, v in vars(obj).items()}
    state = _omegaconf_state(obj)
    if state is not None:
        # a DictConfig / ListConfig keeps its items in _content, a value node its value in _val; read them
        # directly rather than through omegaconf, which may not be installed (or only partly allow-listed)
        if "_content" in state:
            return plain(state["_content"])
        if "_val" in state:
            return plain(state["_val"])
        return plain(dict(obj)) if isinstance(obj, _Unpickled) and len(obj) else None
    if isinstance(obj, Mapping):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


@dataclass
class PluginCheckpoint:
    tensors: Dict[str, torch.Tensor]   # plugin names (no prefix)
    config: TransNormerConfig
    special_ids: Dict[str, Optional[int]]
    released_config: Optional[dict]
    dict_path: Optional[Path]
    path: Path


def read_plugin_checkpoint(path, trusted: bool = False) -> PluginCheckpoint:
    """A fairseq-format checkpoint of ``transnormer_llm`` (written here or by fairseq-train), checked."""
    path = Path(path)
    state = load_fairseq_file(path, trusted)
    if not isinstance(state, Mapping) or not isinstance(state.get("model"), Mapping):
        raise ValueError(f"{path}: not a fairseq checkpoint (no 'model' state dict)")
    # a corrupt entry (a config value of the wrong type, a damaged tensor) is named together with the file
    with errors_name(path):
        cfg_entry, args_entry = _mapping_or_none(plain(state.get("cfg"))), _mapping_or_none(plain(state.get("args")))
        model_args = (cfg_entry or {}).get("model") or args_entry
        if not isinstance(model_args, Mapping):
            raise ValueError("neither cfg['model'] nor args hold the model arguments")
        _refuse_model_parallel(path, cfg_entry, model_args)
        _check_arch(path, model_args)
        sd = dict(state["model"])
        not_tensors = [k for k, v in sd.items() if not torch.is_tensor(v)]
        if not_tensors:
            raise ValueError(f"model entries that are not tensors: {not_tensors[:5]}")
        vocab_size = _vocab_rows(path, sd)
        data_dir = (_mapping_or_none((cfg_entry or {}).get("task")) or model_args).get("data")
        meta = _mapping_or_none(plain(state.get(METADATA_KEY))) or {}
        dict_path = find_dict(path.parent, data_dir, vocab_size)
        released_config = meta.get("released_config") or _released_config_beside(path.parent, dict_path)
        special = _special_ids(meta, released_config)
        cfg = config_from_fairseq_args(model_args, vocab_size, special)
        check_tensors(cfg, sd, FAIRSEQ_PREFIX)
        check_tensor_values(sd)
    tensors = {k[len(FAIRSEQ_PREFIX):]: v for k, v in sd.items()}
    return PluginCheckpoint(tensors, cfg, special, released_config, dict_path, path)


def _mapping_or_none(entry) -> Optional[Mapping]:
    if entry is None or isinstance(entry, Mapping):
        return entry
    raise ValueError(f"expected a dict or a namespace, found a {type(entry).__name__}")


def _refuse_model_parallel(path, cfg_entry, model_args):
    common = _mapping_or_none((cfg_entry or {}).get("common")) or {}
    size = common.get("model_parallel_size") or model_args.get("model_parallel_size") or 1
    if int(size) > 1:
        raise ValueError(f"{path}: one part of a --model-parallel-size {size} checkpoint; consolidate it first: "
                         f"python -m tnllm_plugin.parallel CKPT --from-size {size} --to-size 1 --out OUT.pt")


def _vocab_rows(path, sd) -> int:
    for name in ("embed_tokens.weight", "lm_head.weight"):
        if FAIRSEQ_PREFIX + name in sd:
            return int(sd[FAIRSEQ_PREFIX + name].shape[0])
    prefixes = sorted({k.split(".")[0] for k in sd})
    raise ValueError(f"{path}: missing from checkpoint: {FAIRSEQ_PREFIX}embed_tokens.weight and "
                     f"{FAIRSEQ_PREFIX}lm_head.weight (its tensors start with {prefixes})")


def _special_ids(meta: Mapping, released_config: Optional[Mapping]) -> Dict[str, Optional[int]]:
    if meta.get("special_ids"):
        ids = dict(meta["special_ids"])
    elif released_config is not None:
        ids = {"pad_id": int(released_config.get("pad_token_id", 0)),
               "bos_id": int(released_config.get("bos_token_id", 1)),
               "eos_id": int(released_config.get("eos_token_id", 2))}
    else:   # fairseq-train's own vocabulary
        return dict(FAIRSEQ_IDS)
    unk = (released_config or {}).get("unk_token_id")
    ids["unk_id"] = None if unk is None else int(unk)
    return ids


def find_dict(ckpt_dir: Path, data_dir: Optional[str], vocab_size: int) -> Optional[Path]:
    """dict.txt beside the checkpoint, else in the first fairseq data directory, if its size fits."""
    candidates = [Path(ckpt_dir) / DICT_NAME]
    if data_dir:
        # fairseq-train stores the data path as given: relative to where it ran, often the checkpoint dir's parent
        data = Path(str(data_dir).split(os.pathsep)[0])
        candidates += [data / DICT_NAME] if data.is_absolute() else \
            [data / DICT_NAME, Path(ckpt_dir) / data / DICT_NAME, Path(ckpt_dir).parent / data / DICT_NAME]
    for p in candidates:
        if p.is_file():
            if fairseq_dict_size(p) == vocab_size:
                return p.resolve()
            warnings.warn(f"{p} gives a fairseq dictionary of {fairseq_dict_size(p)} entries, the model has "
                          f"{vocab_size} rows: not used", stacklevel=3)
    return None


def _released_config_beside(ckpt_dir: Path, dict_path: Optional[Path]) -> Optional[dict]:
    for d in [Path(ckpt_dir)] + ([dict_path.parent] if dict_path else []):
        if (d / RELEASED_CONFIG_COPY).is_file():
            return read_json(d / RELEASED_CONFIG_COPY)
    return None


# =============================================================================================================
# Checking tensors against the architecture

def _expected_shapes(cfg: TransNormerConfig, prefix: str = "") -> Dict[str, tuple]:
    """Names and shapes of the model's state dict, from a model on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = TransNormerLLM(cfg)
    return {prefix + k: tuple(v.shape) for k, v in model.state_dict().items()}


def _expected_released_shapes(cfg: TransNormerConfig) -> Dict[str, tuple]:
    shapes = _expected_shapes(cfg)
    renamed = state_dict_to_released({k: k for k in shapes})
    return {new: shapes[old] for new, old in renamed.items()}


# =============================================================================================================
# Conversions

def released_to_plugin(src, out_dir, overwrite: bool = False, allowed_keys=(),
                       use_fairseq: Optional[bool] = None) -> List[Path]:
    """Released directory (or a ReleasedCheckpoint read from one) -> OUT_DIR/checkpoint.pt (fairseq format),
    dict.txt, released_config.json and the tokenizer files. OUT_DIR is also the ``data`` directory fairseq's
    language_modeling task reads dict.txt from. Returns the written paths."""
    released = src if isinstance(src, ReleasedCheckpoint) else read_released(src, allowed_keys)
    cfg = released.model_config
    out = Path(out_dir)
    existing = [n for n in (PLUGIN_CHECKPOINT_NAME, DICT_NAME, RELEASED_CONFIG_COPY) if (out / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds {existing}; choose another directory or overwrite")
    state = plugin_checkpoint_state(cfg, state_dict_from_released(released.tensors), str(out.resolve()),
                                    released.config, use_fairseq)
    with StagedOutput(out, last=PLUGIN_CHECKPOINT_NAME) as stage:
        torch.save(state, stage.path / PLUGIN_CHECKPOINT_NAME)
        _write_or_copy_dict(released.directory, stage.path, cfg.vocab_size)
        (stage.path / RELEASED_CONFIG_COPY).write_text(json.dumps(released.config, indent=2) + "\n")
        copy_companions(released.directory, stage.path)
    return stage.written


def _write_or_copy_dict(src: Path, out: Path, vocab_size: int) -> Path:
    source_dict = src / DICT_NAME
    if source_dict.is_file() and fairseq_dict_size(source_dict) == vocab_size:
        shutil.copyfile(source_dict, out / DICT_NAME)
        return out / DICT_NAME
    return write_fairseq_dict(out / DICT_NAME, vocab_size)


def copy_companions(src: Path, out: Path) -> List[Path]:
    """Tokenizer and generation files, copied verbatim (they belong to the vocabulary, not to a format)."""
    copied = []
    for p in sorted(Path(src).iterdir()):
        if p.is_file() and any(fnmatch.fnmatch(p.name, pattern) for pattern in COMPANION_PATTERNS):
            shutil.copyfile(p, out / p.name)
            copied.append(out / p.name)
    return copied


def plugin_to_released(ckpt, out_dir, safetensors: bool = False, max_shard_size=None, overwrite: bool = False,
                       trusted: bool = False) -> List[Path]:
    """Plugin (fairseq-format) checkpoint -> released directory. The config is the source's config.json when
    the checkpoint carries it and it still describes the model, else derived from the model arguments (with
    the checkpoint vocabulary's special ids). A dict.txt that holds real symbols travels along."""
    plugin = read_plugin_checkpoint(_plugin_file(Path(ckpt)), trusted)
    config = released_config_for(plugin.config, plugin.released_config, plugin.tensors["embed_tokens.weight"].dtype)
    out = Path(out_dir)
    stale = _released_files_in(out, overwrite)
    with StagedOutput(out, stale, last=CONFIG_NAME) as stage:
        _stage_released(stage.path, config, state_dict_to_released(plugin.tensors), safetensors, max_shard_size)
        if plugin.dict_path is not None and not _is_placeholder_dict(plugin.dict_path):
            shutil.copyfile(plugin.dict_path, stage.path / DICT_NAME)
        copy_companions(plugin.path.parent, stage.path)
    return stage.written


def _plugin_file(path: Path) -> Path:
    if path.is_dir():
        if (path / PLUGIN_CHECKPOINT_NAME).is_file():
            return path / PLUGIN_CHECKPOINT_NAME
        found = sorted(p.name for p in path.glob("*.pt"))
        raise FileNotFoundError(f"{path}: no {PLUGIN_CHECKPOINT_NAME}" + (f"; name one of {found}" if found else ""))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


# =============================================================================================================
# Loading a model without a host

def load_model(path, device="cpu", dtype: Optional[torch.dtype] = None, trusted: bool = False
               ) -> Tuple[TransNormerLLM, CheckpointInfo]:
    """Load TransNormerLLM from a released directory (config.json + weights), a plugin directory (with
    checkpoint.pt) or a fairseq-format checkpoint file (written here or by fairseq-train). Needs neither
    fairseq nor transformers. The model comes back in eval mode on ``device``, its tensors in the stored dtype
    unless ``dtype`` is given (the decay rates stay fp32 either way). See CheckpointInfo for ``info``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint file or directory: {path}")
    if _is_released_path(path):
        cfg, tensors, info = _load_released_for_model(path if path.is_dir() else path.parent)
    else:
        cfg, tensors, info = _load_plugin_for_model(_plugin_file(path), trusted)
    dtypes = collections.Counter(t.dtype for t in tensors.values())
    if dtype is None and len(dtypes) > 1:   # the model's matmuls would fail on the first forward
        common = dtypes.most_common(1)[0][0]
        odd = [f"{k} ({t.dtype})" for k, t in tensors.items() if t.dtype != common]
        raise ValueError(f"{info.path}: tensors of several dtypes: most are {common}, but {odd[:5]}; pass dtype= to "
                         f"load them as one")
    model = build_with_tensors(cfg, tensors)
    model.to(device=device, dtype=dtype)
    info.dtype = dtype or tensors["embed_tokens.weight"].dtype
    return model.eval(), info


def _is_released_path(path: Path) -> bool:
    if path.is_dir():
        return (path / CONFIG_NAME).is_file()
    names = set(WEIGHTS_NAME.values()) | set(INDEX_NAME.values()) | {CONFIG_NAME}
    return path.name in names or any(fnmatch.fnmatch(path.name, p) for p in SHARD_PATTERN.values())


def _load_released_for_model(directory: Path):
    released = read_released(directory)
    cfg = released.model_config
    unk = released.config.get("unk_token_id")
    info = CheckpointInfo(
        path=str(directory), format="released", config=cfg, vocab_size=cfg.vocab_size, pad_id=cfg.pad_id,
        bos_id=cfg.bos_id, eos_id=cfg.eos_id, unk_id=None if unk is None else int(unk),
        dict_path=_str_or_none(find_dict(directory, None, cfg.vocab_size)), released_config=released.config,
        unknown_config_keys=released.unknown_keys)
    return cfg, state_dict_from_released(released.tensors), info


def _load_plugin_for_model(path: Path, trusted: bool):
    plugin = read_plugin_checkpoint(path, trusted)
    cfg, ids = plugin.config, plugin.special_ids
    info = CheckpointInfo(
        path=str(path), format="plugin", config=cfg, vocab_size=cfg.vocab_size, pad_id=ids["pad_id"],
        bos_id=ids["bos_id"], eos_id=ids["eos_id"], unk_id=ids.get("unk_id"),
        dict_path=_str_or_none(plugin.dict_path), released_config=plugin.released_config)
    return cfg, plugin.tensors, info


def _str_or_none(p) -> Optional[str]:
    return None if p is None else str(p)


def build_with_tensors(cfg: TransNormerConfig, tensors: Mapping[str, torch.Tensor]) -> TransNormerLLM:
    """TransNormerLLM whose parameters are ``tensors`` themselves (checked first): the parameters are created on
    the meta device, so there is no random init and no second copy of a large model; buffers (the fixed decay
    rates) are computed as usual."""
    check_tensor_shapes(_expected_shapes(cfg), tensors)
    with _parameters_on_meta():
        model = TransNormerLLM(cfg)
    model.load_state_dict(dict(tensors), strict=True, assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"not materialised after loading: {left}")
    return model


@contextlib.contextmanager
def _parameters_on_meta():
    # Module construction registers each parameter through register_parameter; moving them to meta there keeps
    # initialisers cheap while buffers stay real. Not thread-safe: other threads building modules meanwhile
    # would get meta parameters too.
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


# =============================================================================================================
# CLI

def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB"):
        if nbytes < 1000:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} GB"


def _report(written: List[Path]):
    for p in written:
        print(f"wrote {p} ({_human(p.stat().st_size)})")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="convert_checkpoint.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r2p = sub.add_parser("released-to-plugin", help="released HF directory -> fairseq checkpoint + dict.txt")
    r2p.add_argument("src_dir")
    r2p.add_argument("out_dir", help="gets checkpoint.pt, dict.txt, released_config.json (also fairseq's data dir)")
    r2p.add_argument("--allow-config-key", action="append", default=[], metavar="KEY",
                     help="declare an unknown config.json key harmless (repeatable)")
    p2r = sub.add_parser("plugin-to-released", help="fairseq checkpoint -> released HF directory")
    p2r.add_argument("ckpt", help="checkpoint file, or a directory holding checkpoint.pt")
    p2r.add_argument("out_dir")
    p2r.add_argument("--safetensors", action="store_true", help="model.safetensors instead of pytorch_model.bin")
    p2r.add_argument("--max-shard-size", default=None,
                     help="e.g. 2GB: shards of at most this size plus an index json (default: one file)")
    p2r.add_argument("--trust-checkpoint", action="store_true",
                     help="unpickle the checkpoint with weights_only=False (only files you made yourself)")
    for p in (r2p, p2r):
        p.add_argument("--overwrite", action="store_true", help="replace files of a previous conversion")
    args = ap.parse_args(argv)
    if args.command == "released-to-plugin":
        released = read_released(args.src_dir, args.allow_config_key)
        print(f"read {args.src_dir}: {len(released.tensors)} tensors, {released.layout}")
        written = released_to_plugin(released, args.out_dir, args.overwrite)
        cfg = released.model_config
    else:
        written = plugin_to_released(args.ckpt, args.out_dir, args.safetensors, args.max_shard_size,
                                     args.overwrite, args.trust_checkpoint)
        cfg = config_from_released(json.loads((Path(args.out_dir) / CONFIG_NAME).read_text()))
    _report(written)
    print(f"vocab {cfg.vocab_size}; special ids pad {cfg.pad_id}, bos {cfg.bos_id}, eos {cfg.eos_id}; "
          f"LRPE layers {list(cfg.lrpe_layers)}; decay {cfg.decay}")


if __name__ == "__main__":
    main()
