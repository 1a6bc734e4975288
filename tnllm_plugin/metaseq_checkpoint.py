"""Released checkpoints -> Metaseq checkpoints, which metaseq-validate, Metaseq's generator and metaseq-train
(--restore-file, --finetune-from-model) load. The other direction needs nothing Metaseq-specific:
``convert.plugin_to_released`` reads Metaseq's checkpoints as it reads fairseq's.

    python -m tnllm_plugin.metaseq_checkpoint RELEASED_DIR OUT_DIR --data DATA --vocab-filename vocab.json \\
        --merges-filename merges.txt

Metaseq's tasks take their vocabulary from a byte-level BPE (vocab.json, merges.txt), with <s> <pad> </s> <unk>
at ids 0-3; its dictionary is the BPE's size padded up to --final-vocab-size, which is written as the model's
vocabulary size. Token id k is embedding row k, as everywhere in convert.py. Needs Metaseq (its own parser
writes the checkpoint's config, so every section a Metaseq loader reads exists).
"""
import argparse
import json
import warnings
from pathlib import Path
from typing import List

import torch

from .checkpoint import state_dict_from_released
from .model import TransNormerConfig
from .plugin_checkpoint import PLUGIN_DIR, fairseq_arch_name, model_arg_flags, plugin_checkpoint_state
from .released_format import StagedOutput, read_released

CHECKPOINT_NAME = "checkpoint_last.pt"


def metaseq_cfg(cfg: TransNormerConfig, data: str, vocab_filename: str, merges_filename: str) -> dict:
    """The ``cfg`` entry of a Metaseq checkpoint of ``cfg``: what metaseq-train records for the command line
    that trains this model with the streaming_language_modeling task on ``data``."""
    from metaseq import options
    from metaseq.dataclass.utils import convert_namespace_to_omegaconf
    from omegaconf import OmegaConf

    from . import metaseq_adapter  # noqa: F401  (registers transnormer_llm)
    argv = [data, "--task", "streaming_language_modeling", "--vocab-filename", vocab_filename,
            "--merges-filename", merges_filename, "--final-vocab-size", str(cfg.vocab_size),
            "--arch", fairseq_arch_name(cfg), "--criterion", "transnormer_llm_cross_entropy", *model_arg_flags(cfg)]
    with warnings.catch_warnings():      # hydra's notices about Metaseq's own config use
        warnings.simplefilter("ignore")
        parsed = options.parse_args_and_arch(options.get_training_parser(), argv)
        parsed.user_dir = str(PLUGIN_DIR)
        return OmegaConf.to_container(convert_namespace_to_omegaconf(parsed))


def released_to_metaseq(src, out_dir, data: str, vocab_filename: str, merges_filename: str,
                        overwrite: bool = False) -> List[Path]:
    """Released directory -> OUT_DIR/checkpoint_last.pt, a Metaseq checkpoint of the same weights."""
    released = read_released(src)
    cfg = released.model_config
    vocab = _bpe_size(vocab_filename)
    if vocab > cfg.vocab_size:
        raise ValueError(f"{vocab_filename}: the BPE has {vocab} tokens, more than the checkpoint's vocabulary "
                         f"of {cfg.vocab_size} ({released.directory})")
    out = Path(out_dir)
    if (out / CHECKPOINT_NAME).exists() and not overwrite:
        raise FileExistsError(f"{out / CHECKPOINT_NAME} exists; choose another directory or overwrite")
    host_cfg = metaseq_cfg(cfg, str(Path(data).resolve()), str(Path(vocab_filename).resolve()),
                           str(Path(merges_filename).resolve()))
    state = plugin_checkpoint_state(cfg, state_dict_from_released(released.tensors), str(data),
                                    released.config, host_cfg=host_cfg)
    with StagedOutput(out, last=CHECKPOINT_NAME) as stage:
        torch.save(state, stage.path / CHECKPOINT_NAME)
    return stage.written


def _bpe_size(vocab_filename) -> int:
    try:
        return len(json.loads(Path(vocab_filename).read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:
        raise ValueError(f"{vocab_filename}: not a readable BPE vocab.json ({e})") from None


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tnllm_plugin.metaseq_checkpoint", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("released", help="released directory (config.json + weights)")
    ap.add_argument("out", help="output directory for checkpoint_last.pt")
    ap.add_argument("--data", required=True, help="the data directory the task will read (streaming layout)")
    ap.add_argument("--vocab-filename", required=True)
    ap.add_argument("--merges-filename", required=True)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    for path in released_to_metaseq(args.released, args.out, args.data, args.vocab_filename,
                                    args.merges_filename, args.overwrite):
        print(path)


if __name__ == "__main__":
    main()
