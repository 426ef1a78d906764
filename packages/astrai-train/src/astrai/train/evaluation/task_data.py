"""Documents of local lm-eval tasks, read from files a task YAML names.

lm-eval loads a task's data with ``datasets.load_dataset``, which resolves a relative path
against the working directory; a task YAML that ships beside its sample data wants paths
relative to itself. The YAMLs under configs/eval/ therefore name ``custom_dataset: !function
local_data.jsonl`` (or ``.text``), a three-line module beside them that calls these loaders
with its own folder as ``base_dir``. lm-eval calls the loader with the task's
``dataset_kwargs`` (and its ``metadata``, ignored here)::

    custom_dataset: !function local_data.jsonl
    dataset_kwargs:
      data_files: {test: samples/mmlu_style.jsonl, dev: samples/mmlu_style_dev.jsonl}
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

from astrai.core.errors import require

DOCUMENT_SPLITS = ("paragraphs", "lines", "file")


def resolve_files(data_files: Mapping[str, str] | str, base_dir: str | Path) -> dict[str, Path]:
    """{split: path}, relative paths taken from base_dir; a single path is the "test" split."""
    if isinstance(data_files, (str, Path)):
        data_files = {"test": data_files}
    require(
        isinstance(data_files, Mapping) and data_files,
        "dataset_kwargs.data_files",
        f"must map split names to files, e.g. {{test: data.jsonl}}; got {data_files!r}",
    )
    paths = {}
    for split, name in data_files.items():
        path = Path(name).expanduser()
        path = path if path.is_absolute() else Path(base_dir) / path
        require(path.is_file(), f"dataset_kwargs.data_files.{split}", f"names {path}, which is not a file")
        paths[split] = path
    return paths


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                require(False, f"{path}, line {n}", f"is not JSON ({e.msg}); write one JSON object per line")
    require(rows, str(path), "has no rows; write one JSON object per line")
    return rows


def split_documents(text: str, documents: str) -> list[str]:
    """The documents of a text file: blank-line separated paragraphs, single lines or the whole file."""
    require(documents in DOCUMENT_SPLITS, "dataset_kwargs.documents", f"must be one of {DOCUMENT_SPLITS}")
    if documents == "file":
        parts = [text.strip()]
    elif documents == "lines":
        parts = [line.strip() for line in text.splitlines()]
    else:
        parts = [p.strip() for p in re.split(r"\n\s*\n", text)]
    return [p for p in parts if p]


def jsonl(base_dir: str | Path, data_files: Mapping[str, str] | str, **_) -> dict:
    """One datasets.Dataset per split, a row per JSON line."""
    import datasets

    return {
        split: datasets.Dataset.from_list(read_jsonl(p)) for split, p in resolve_files(data_files, base_dir).items()
    }


def text(base_dir: str | Path, data_files: Mapping[str, str] | str, documents: str = "paragraphs", **_) -> dict:
    """One datasets.Dataset per split of {"text": document} rows (for loglikelihood_rolling tasks)."""
    import datasets

    splits = {}
    for split, path in resolve_files(data_files, base_dir).items():
        docs = split_documents(path.read_text(encoding="utf-8"), documents)
        require(docs, str(path), "has no text")
        splits[split] = datasets.Dataset.from_list([{"text": d} for d in docs])
    return splits
