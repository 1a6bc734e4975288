"""The tiny tasks' documents: items.jsonl beside this file, as the split "test". The path is resolved here, so
the tasks work from any directory (a data_files path in the YAML would be relative to the current directory)."""
from pathlib import Path

import datasets

ITEMS = Path(__file__).resolve().parent / "items.jsonl"


def load(**_metadata):
    """lm-eval's custom_dataset hook; it passes the task's metadata as keyword arguments (not needed here)."""
    return datasets.load_dataset("json", data_files={"test": str(ITEMS)})
