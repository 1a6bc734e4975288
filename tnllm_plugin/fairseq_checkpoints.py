"""fairseq's checkpoint files, made safe against a killed job, a damaged file and a restart in a later epoch.

What fairseq 0.12 does, and what is changed here when the fairseq adapter is imported (``--user-dir tnllm_plugin``):
  * It writes the first checkpoint of a save (e.g. ``checkpoint_1_500.pt``) to ``NAME.tmp`` and renames it, but
    makes the others (``checkpoint_last.pt``, ``checkpoint_best.pt``) with ``PathManager.copy``, a plain
    ``shutil.copyfile`` over the old file: a job killed during that copy leaves a truncated ``checkpoint_last.pt``,
    the file a restart resumes from. Here: copied to ``NAME.tmp`` and renamed (local paths; paths served by iopath
    handlers, remote stores, are left to them).
  * A checkpoint it cannot read fails with the decoder's error (``OSError: [Errno 22] Invalid argument``,
    ``PytorchStreamReader failed ...``), and a damaged argument or tensor fails in the model's constructor or
    load_state_dict when fairseq-eval-lm or fairseq-generate build the model from it: neither names the file. A
    flipped bit in a tensor loads (torch.load does not check the CRC-32 the zip format keeps), and a NaN weight
    loads and trains NaNs. Here: CRC-32 and NaN / inf checks, and every error names the file (resuming,
    fairseq-eval-lm, fairseq-generate, interactive, the hub), as do errors in reading a dict.txt.
  * The language-model task groups examples into batches once, with ``numpy_seed(seed + epoch)`` of the epoch its
    iterator starts in (later epochs only reorder those batches), so a job resumed in epoch 2 or later regroups
    every batch and its ``iterations_in_epoch`` skip other examples than those it trained on. Here: batches are
    grouped as in epoch 1 whatever epoch a run starts in, which is what an uninterrupted run uses in every epoch (a
    fresh run is unchanged).
"""
import functools
import os
import re
import shutil
import zipfile

import torch
from fairseq import checkpoint_utils
from fairseq.data import Dictionary
from fairseq.file_io import PathManager
from fairseq.tasks.language_modeling import LanguageModelingTask

from .checkpoint import check_tensor_values
from .file_checks import check_zip_checksums, errors_name, unreadable_names
from .plugin_checkpoint import FAIRSEQ_PREFIX, plain


def copy_to_temporary_then_rename(src_path: str, dst_path: str, overwrite: bool = False):
    """PathManager.copy for local files: the copy goes to ``DST.tmp`` and replaces ``DST`` by a rename, so ``DST`` is
    at every moment either the old file or the whole new one."""
    tmp = f"{dst_path}.tmp"
    shutil.copyfile(src_path, tmp)
    os.replace(tmp, dst_path)
    return dst_path          # fairseq asserts a true value, as shutil.copyfile returns


def check_model_args(state) -> None:
    """decoder_layers and decoder_embed_dim of a transnormer_llm checkpoint against its tensors, before fairseq builds
    the model its arguments describe (a corrupt decoder_layers=10**12 would be built block by block until memory
    runs out). Both are the same on every model-parallel rank and under FSDP's flattened state there is nothing to
    compare."""
    cfg = plain(state.get("cfg")) or {}
    args = (cfg.get("model") if isinstance(cfg, dict) else None) or plain(state.get("args")) or {}
    if not isinstance(args, dict) or not str(args.get("arch") or args.get("_name") or "").startswith("transnormer_llm"):
        return
    names = state.get("model") or {}
    layers = {int(m.group(1)) for k in names if (m := re.match(re.escape(FAIRSEQ_PREFIX) + r"layers\.(\d+)\.", k))}
    if layers and int(args.get("decoder_layers")) != len(layers):
        raise ValueError(f"the model arguments say decoder_layers={args.get('decoder_layers')}, the checkpoint holds "
                         f"{len(layers)} layers")
    embed = names.get(FAIRSEQ_PREFIX + "embed_tokens.weight")
    if torch.is_tensor(embed) and embed.dim() == 2 and int(args.get("decoder_embed_dim")) != embed.shape[1]:
        raise ValueError(f"the model arguments say decoder_embed_dim={args.get('decoder_embed_dim')}, the checkpoint's "
                         f"embedding has {embed.shape[1]} columns")


def install():
    original_copy = PathManager.copy
    if getattr(original_copy, "tnllm_installed", False):
        return

    @functools.wraps(original_copy)
    def copy(src_path, dst_path, overwrite=False):
        if PathManager.path_requires_pathmanager(dst_path):
            return original_copy(src_path, dst_path, overwrite)
        return copy_to_temporary_then_rename(src_path, dst_path, overwrite)

    original_load = checkpoint_utils.load_checkpoint_to_cpu

    # fairseq's trainer (resuming), load_model_ensemble_and_task (eval-lm, generate, the hub) all go through it
    @functools.wraps(original_load)
    def load_checkpoint_to_cpu(path, *args, **kwargs):
        if os.path.isfile(path) and zipfile.is_zipfile(path):
            check_zip_checksums(path)
        with unreadable_names(path):
            state = original_load(path, *args, **kwargs)
        weights = {k: v for k, v in (state.get("model") or {}).items() if torch.is_tensor(v) and v.is_floating_point()}
        with errors_name(path):
            check_tensor_values(weights)
            check_model_args(state)
        return state

    original_ensemble = checkpoint_utils.load_model_ensemble_and_task

    # fairseq-eval-lm, fairseq-generate, interactive and the hub build the model from the checkpoint's own arguments
    # here: a damaged argument or tensor fails in the model's constructor or load_state_dict, which know no file
    @functools.wraps(original_ensemble)
    def load_model_ensemble_and_task(filenames, *args, **kwargs):
        try:
            return original_ensemble(filenames, *args, **kwargs)
        except Exception as e:
            names = [str(f) for f in filenames]
            if any(n in str(e) for n in names):
                raise
            raise ValueError(f"{', '.join(names)}: cannot make the model this checkpoint describes "
                             f"({type(e).__name__}: {e})") from e

    original_add_from_file = Dictionary.add_from_file

    # the task's dict.txt (beside a converted checkpoint, in the data directory): a malformed line (ValueError) or a
    # repeated symbol (RuntimeError) is an error that quotes the line but not the file
    @functools.wraps(original_add_from_file)
    def add_from_file(self, f):
        if not isinstance(f, str):
            return original_add_from_file(self, f)
        try:
            return original_add_from_file(self, f)
        except (ValueError, RuntimeError) as e:
            raise ValueError(f"{f}: {e}") from e

    original_batches = LanguageModelingTask.get_batch_iterator

    @functools.wraps(original_batches)
    def get_batch_iterator(self, dataset, *args, epoch=1, **kwargs):
        # only an iterator that is kept across epochs freezes the batches of its first epoch; one made anew every
        # epoch (sharded data, update_epoch_batch_itr) is seeded by that epoch in any run, resumed or not
        kept = self.can_reuse_epoch_itr(dataset) and not kwargs.get("disable_iterator_cache") \
            and not kwargs.get("update_epoch_batch_itr")
        if not kept or epoch == 1:
            return original_batches(self, dataset, *args, epoch=epoch, **kwargs)
        running = self.dataset_to_epoch_iter.get(dataset)      # the running iterator, asked for its next epoch
        itr = original_batches(self, dataset, *args, epoch=1, **kwargs)     # the batches of epoch 1
        if itr is not running:          # a new iterator, not yet iterated: start it at ``epoch``
            dataset.set_epoch(epoch)
            itr.epoch = epoch
        return itr

    copy.tnllm_installed = True
    PathManager.copy = staticmethod(copy)
    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu
    checkpoint_utils.load_model_ensemble_and_task = load_model_ensemble_and_task
    Dictionary.add_from_file = add_from_file
    LanguageModelingTask.get_batch_iterator = get_batch_iterator
