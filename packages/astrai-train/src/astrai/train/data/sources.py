"""Where training rows come from: local JSONL / JSON / Parquet / Arrow files, directories,
globs, a directory written by ``Dataset.save_to_disk``, or a dataset name for ``datasets``.

Each file is loaded as its own ``Part`` so a bad row can be reported by file and row number.
``load_dataset`` keeps an Arrow copy in the ``datasets`` cache (keyed by path, size and
modification time), and every later ``map`` over it is cached next to that copy.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset

from astrai.core.integrity import atomic_write_text

from .records import SKIP_HINT, DataError

log = logging.getLogger(__name__)

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
Spec = str | list[str]


@dataclass
class Part:
    """One file (or named dataset) of rows; ``origin`` is how errors refer to it."""

    origin: str
    dataset: Dataset
    skipped: list[str] = field(default_factory=list)  # rows dropped while loading (skip mode)


def _looks_local(entry: str) -> bool:
    return (
        Path(entry).suffix.lower() in FILE_BUILDERS
        or any(c in entry for c in "*?[")
        or entry.startswith((".", "/", "~"))
        or os.path.exists(entry)
    )


def _expand(entry: str, field_name: str) -> list[Path]:
    """Files named by a path, a glob or a directory (its supported files, sorted)."""
    path = Path(entry).expanduser()
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_info.json").is_file():
            return [path]  # a save_to_disk directory
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in FILE_BUILDERS and p.is_file())
        if not files:
            raise DataError(f"{field_name}: directory {entry} holds no {'/'.join(FILE_BUILDERS)} files")
        return files
    if path.is_file():
        if path.suffix.lower() not in FILE_BUILDERS:
            raise DataError(f"{field_name}: {entry} has an unsupported type; use one of {', '.join(FILE_BUILDERS)}")
        return [path]
    matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).suffix.lower() in FILE_BUILDERS)
    if not matches:
        raise DataError(f"{field_name}: no data file matches {entry!r} (check the path)")
    return matches


def _line_errors(path: Path) -> tuple[list[str], list[str]]:
    """Split a JSON-lines file into good lines and 'line N: problem' messages."""
    good, bad = [], []
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                bad.append(f"line {lineno}: invalid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(record, dict):
                bad.append(f"line {lineno}: expected a JSON object, got {type(record).__name__}")
                continue
            good.append(line if line.endswith("\n") else line + "\n")
    return good, bad


def _cleaned_copy(path: Path, good: list[str], cache_dir: str | None) -> Path:
    """The readable lines of ``path`` in a file under the cache, named by the source's identity."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "astrai-cleaned"
    root.mkdir(parents=True, exist_ok=True)
    out = root / f"{path.stem}-{key}.jsonl"
    if not out.exists():  # several nodes may write it at once: each through its own temporary file
        atomic_write_text(out, "".join(good))
    return out


def _load_file(path: Path, cache_dir: str | None, skip_bad_rows: bool) -> Part:
    if path.is_dir():
        return Part(str(path), datasets.load_from_disk(str(path)))
    builder = FILE_BUILDERS[path.suffix.lower()]
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir)
        return Part(str(path), ds)
    except datasets.exceptions.DatasetGenerationError as e:
        if builder != "json":
            raise DataError(f"{path}: cannot read the file ({e.__cause__ or e})") from None
        cause = e
    # Arrow's JSON reader says little about where a file is broken: find the line ourselves.
    good, bad = _line_errors(path)
    if not bad:
        raise DataError(f"{path}: cannot read the file as JSON ({cause.__cause__ or cause})") from None
    if not skip_bad_rows:
        raise DataError(f"{path}, {bad[0]}; {SKIP_HINT}") from None
    if not good:
        raise DataError(f"{path}: no readable rows ({bad[0]})") from None
    cleaned = _cleaned_copy(path, good, cache_dir)
    ds = datasets.load_dataset("json", data_files=str(cleaned), split="train", cache_dir=cache_dir)
    return Part(str(path), ds, skipped=bad)


def _load_named(entry: str, field_name: str, cache_dir: str | None, load_kwargs: dict[str, Any]) -> Part:
    name, _, split = entry.partition(":")
    split = split or load_kwargs.pop("split", "train")
    try:
        ds = datasets.load_dataset(name, split=split, cache_dir=cache_dir, **load_kwargs)
    except Exception as e:  # datasets raises many types here (offline, missing split, no such repo)
        raise DataError(
            f"{field_name}: cannot load dataset {entry!r} ({type(e).__name__}: {e}); give a local file "
            f"({', '.join(FILE_BUILDERS)}), a directory, or a dataset name as 'org/name' or 'org/name:split'"
        ) from None
    if not isinstance(ds, Dataset):
        raise DataError(f"{field_name}: {entry!r} is not a map-style dataset; name one split, e.g. '{name}:train'")
    return Part(entry, ds)


def load_parts(
    spec: Spec,
    field_name: str,
    *,
    cache_dir: str | None = None,
    load_kwargs: dict[str, Any] | None = None,
    skip_bad_rows: bool = False,
) -> list[Part]:
    """Load every file / dataset named by ``spec`` (a string or a list of strings)."""
    entries = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not entries or not all(isinstance(e, (str, os.PathLike)) for e in entries):
        raise DataError(f"{field_name}: expected a path, a glob, a dataset name or a list of them, got {spec!r}")
    parts = []
    for entry in map(str, entries):
        if _looks_local(entry):
            parts.extend(_load_file(p, cache_dir, skip_bad_rows) for p in _expand(entry, field_name))
        else:
            parts.append(_load_named(entry, field_name, cache_dir, dict(load_kwargs or {})))
    for part in parts:
        if part.skipped:
            log.warning("%s: skipped %d unreadable rows (first: %s)", part.origin, len(part.skipped), part.skipped[0])
    return parts


def split_off(
    ds: Dataset, fraction: float, seed: int, field_name: str = "data.val_fraction"
) -> tuple[Dataset, Dataset]:
    """A seeded random (train, validation) split of rows; the split is cached by ``datasets``."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"{field_name} must be between 0 and 1 (exclusive), got {fraction}")
    n_val = int(round(len(ds) * fraction))
    if n_val == 0 or n_val == len(ds):
        raise DataError(
            f"{field_name}={fraction} of {len(ds)} rows leaves an empty split; change it or give data.val files"
        )
    split = ds.train_test_split(test_size=n_val, seed=seed, shuffle=True)
    return split["train"], split["test"]
