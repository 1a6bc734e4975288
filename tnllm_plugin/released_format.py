"""The released checkpoints' layout (OpenNLPLab's Hugging Face TransNormerLLM) on disk: what config.json keys mean,
reading a directory (single file or shards, every refusal naming the file) and writing one (shards, staged so a
failed write leaves the directory as it was). Names as in the spec ("Released checkpoint layout")."""
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from .checkpoint import RELEASED_PREFIX, check_tensor_values, config_from_released, config_to_released
from .file_checks import is_zip, check_tensors, check_zip_checksums, errors_name, read_json, unreadable_names
from .model import TransNormerConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = {"bin": "pytorch_model.bin", "safetensors": "model.safetensors"}
INDEX_NAME = {"bin": "pytorch_model.bin.index.json", "safetensors": "model.safetensors.index.json"}
SHARD_PATTERN = {"bin": "pytorch_model-*-of-*.bin", "safetensors": "model-*-of-*.safetensors"}
# Hugging Face's preference when a directory holds several layouts
READ_ORDER = [("safetensors", False), ("safetensors", True), ("bin", False), ("bin", True)]

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
            if is_zip(path):
                check_zip_checksums(path)
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip(path))
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
    stale = released_files_in(out, overwrite)
    with StagedOutput(out, stale, last=CONFIG_NAME) as stage:
        stage_released(stage.path, config, tensors, safetensors, max_shard_size)
    return stage.written


def stage_released(stage: Path, config: Mapping, tensors: Mapping[str, torch.Tensor], safetensors: bool,
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


def released_files_in(out: Path, overwrite: bool) -> List[Path]:
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
