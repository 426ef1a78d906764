"""Loaders the task YAMLs in this folder name with `custom_dataset: !function local_data.<name>`.

They read `dataset_kwargs.data_files` with relative paths taken from this folder (not the
working directory); copy this file along with the YAMLs when you make your own task folder.
"""

from pathlib import Path

from astrai.train.evaluation import task_data

HERE = Path(__file__).resolve().parent


def jsonl(**dataset_kwargs):
    """A split per file, a document per JSON line."""
    return task_data.jsonl(HERE, **dataset_kwargs)


def text(**dataset_kwargs):
    """A split per text file, a document per paragraph (or per line / whole file: `documents`)."""
    return task_data.text(HERE, **dataset_kwargs)
