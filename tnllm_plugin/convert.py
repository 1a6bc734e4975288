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
  Each is read and written by its own module: released_format.py and plugin_checkpoint.py.

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
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Mapping, Optional, Tuple

import torch
from torch import nn

from .checkpoint import check_tensor_shapes, config_from_released, state_dict_from_released, state_dict_to_released
from .file_checks import expected_shapes
from .model import TransNormerConfig, TransNormerLLM
from .plugin_checkpoint import (DICT_NAME, PLUGIN_CHECKPOINT_NAME, RELEASED_CONFIG_COPY, is_placeholder_dict,
                                fairseq_dict_size, find_dict, plugin_checkpoint_state, read_plugin_checkpoint,
                                write_fairseq_dict)
from .released_format import (CONFIG_NAME, INDEX_NAME, SHARD_PATTERN, WEIGHTS_NAME, ReleasedCheckpoint,
                              StagedOutput, released_files_in, stage_released, read_released, released_config_for)

# tokenizer and generation files that travel with the weights (copied verbatim)
COMPANION_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "generation_config.json",
                      "*.model", "vocab.json", "vocab.txt", "merges.txt")


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
    stale = released_files_in(out, overwrite)
    with StagedOutput(out, stale, last=CONFIG_NAME) as stage:
        stage_released(stage.path, config, state_dict_to_released(plugin.tensors), safetensors, max_shard_size)
        if plugin.dict_path is not None and not is_placeholder_dict(plugin.dict_path):
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
    check_tensor_shapes(expected_shapes(cfg), tensors)
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
