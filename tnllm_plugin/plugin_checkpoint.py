"""Plugin (fairseq-format) checkpoints: the ``cfg`` fairseq's checkpoint_utils needs (fairseq_cfg), the state
torch.save writes (plugin_checkpoint_state), dict.txt files, and reading any fairseq-format ``transnormer_llm``
checkpoint (written by the converter, fairseq-train or metaseq-train) without fairseq (read_plugin_checkpoint).
See convert.py for how fairseq's four special symbols line up with the released ids. Nothing here imports fairseq
at module level."""
import argparse
import collections
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional

import torch

from .checkpoint import check_tensor_values
from .file_checks import is_zip, check_tensors, check_zip_checksums, errors_name, read_json, unreadable_names
from .model import TransNormerConfig
from .presets import PRESETS

PLUGIN_DIR = Path(__file__).resolve().parent
PLUGIN_CHECKPOINT_NAME = "checkpoint.pt"
DICT_NAME = "dict.txt"
RELEASED_CONFIG_COPY = "released_config.json"
FAIRSEQ_PREFIX = "decoder.transnormer."
FAIRSEQ_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")         # fairseq Dictionary ids 0, 1, 2, 3
FAIRSEQ_IDS = {"bos_id": 0, "pad_id": 1, "eos_id": 2, "unk_id": 3}
METADATA_KEY = "tnllm"
METADATA_VERSION = 1


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


def is_placeholder_dict(path) -> bool:
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
    if not is_zip(path):       # legacy (non-zip) file: weights_only loading below says what it refuses
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
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip(path))


def _omegaconf_state(obj) -> Optional[dict]:
    if isinstance(obj, _Unpickled):
        state = getattr(obj, "pickled_state", None)
        if isinstance(state, tuple) and len(state) == 2:      # (dict state, slot state)
            state = state[0]
        return state if isinstance(state, dict) else {}
    if type(obj).__module__.split(".")[0] == "omegaconf" and hasattr(obj, "__dict__"):
        return vars(obj)
    return None


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
