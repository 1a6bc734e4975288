"""fairseq's checkpoint files, made safe against a killed job and named when they cannot be read.

fairseq 0.12 writes the first checkpoint of a save (e.g. ``checkpoint_1_500.pt``) to ``NAME.tmp`` and renames it,
but then makes the others (``checkpoint_last.pt``, ``checkpoint_best.pt``) with ``PathManager.copy``, a plain
``shutil.copyfile`` over the old file: a job killed during that copy leaves a truncated ``checkpoint_last.pt``, the
file a restart resumes from. And a checkpoint it cannot read fails with the decoder's error (``OSError: [Errno 22]
Invalid argument``, ``PytorchStreamReader failed ...``), naming no file. Both are fixed here, for local paths, when
the fairseq adapter is imported (``--user-dir tnllm_plugin``); paths served by iopath handlers (remote stores) are
left to them.
"""
import functools
import os
import shutil

from fairseq import checkpoint_utils
from fairseq.file_io import PathManager

from .convert import unreadable_names


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
        with unreadable_names(path):
            return original_load(path, *args, **kwargs)

    copy.tnllm_installed = True
    PathManager.copy = staticmethod(copy)
    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu
