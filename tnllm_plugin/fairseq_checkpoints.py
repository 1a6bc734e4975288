"""fairseq's checkpoint files, made safe against a killed job and named when they cannot be read.

fairseq 0.12 writes the first checkpoint of a save (e.g. ``checkpoint_1_500.pt``) to ``NAME.tmp`` and renames it,
but then makes the others (``checkpoint_last.pt``, ``checkpoint_best.pt``) with ``PathManager.copy``, a plain
``shutil.copyfile`` over the old file: a job killed during that copy leaves a truncated ``checkpoint_last.pt``, the
file a restart resumes from. And a checkpoint it cannot read fails with the decoder's error (``OSError: [Errno 22]
Invalid argument``, ``PytorchStreamReader failed ...``), naming no file, while one with a flipped bit in a tensor
loads (torch.load does not check the CRC-32 the zip format keeps) and one holding a NaN weight loads and trains NaNs. And a job resumed in its second or a later epoch trains on other batches than the uninterrupted job:
the task groups examples into batches once, with ``numpy_seed(seed + epoch)`` of the epoch its iterator starts in
(the batches are then frozen and only reordered per epoch), so a restart in epoch 2 regroups every batch, and the
``iterations_in_epoch`` it skips are other examples than those already trained on. All four are fixed here when the
fairseq adapter is imported (``--user-dir tnllm_plugin``): copies for local paths (paths served by iopath handlers,
remote stores, are left to them); checks for every checkpoint fairseq loads (resuming, fairseq-eval-lm,
fairseq-generate, the hub); language-model batches grouped as in epoch 1 whatever epoch a run starts in, which is
what an uninterrupted run uses in every epoch (a fresh run is unchanged).
"""
import functools
import os
import shutil
import zipfile

import torch
from fairseq import checkpoint_utils
from fairseq.file_io import PathManager
from fairseq.tasks.language_modeling import LanguageModelingTask

from .checkpoint import check_tensor_values
from .convert import check_zip_checksums, errors_name, unreadable_names


def copy_to_temporary_then_rename(src_path: str, dst_path: str, overwrite: bool = False):
    """PathManager.copy for local files: the copy goes to ``DST.tmp`` and replaces ``DST`` by a rename, so ``DST`` is
    at every moment either the old file or the whole new one."""
    tmp = f"{dst_path}.tmp"
    shutil.copyfile(src_path, tmp)
    os.replace(tmp, dst_path)
    return dst_path          # fairseq asserts a true value, as shutil.copyfile returns


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
        return state

    original_batches = LanguageModelingTask.get_batch_iterator

    @functools.wraps(original_batches)
    def get_batch_iterator(self, dataset, *args, epoch=1, **kwargs):
        cached = self.dataset_to_epoch_iter.get(dataset)       # the running iterator, asked for its next epoch
        itr = original_batches(self, dataset, *args, epoch=1, **kwargs)     # the batches of epoch 1
        if itr is not cached and epoch > 1:        # a new iterator, not yet iterated: start it at ``epoch``
            dataset.set_epoch(epoch)
            itr.epoch = epoch
        return itr

    copy.tnllm_installed = True
    PathManager.copy = staticmethod(copy)
    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu
    LanguageModelingTask.get_batch_iterator = get_batch_iterator
