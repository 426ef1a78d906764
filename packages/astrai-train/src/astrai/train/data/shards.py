"""Upstream AstrAI's preprocessed token shards, read where they lie.

Upstream's preprocessing (``astrai/preprocessing`` at v1.3.9, ``output.storage_format: bin``)
writes ``<out>/<domain>/shard_NNNN/`` directories, each with a ``meta.json`` and one
``<key>.bin`` per key. A ``.bin`` file holds the key's values of every document of the shard,
concatenated, as raw little-endian array bytes (``numpy.tofile``, no header); ``meta.json``
maps each key to ``{"shape": [length], "dtype": "<torch dtype name>"}``. Pre-training shards
have ``sequence`` (token ids, ``int32`` unless ``output.dtype`` chose another), usually
``position_ids`` (``doc_reset``, the default: restarting at 0 at each document, the only
record of where a document starts, since no separator token is inserted) and, for chat data,
``loss_mask`` (1 = a trained token).

These corpora are often larger than memory and already tokenised, so they are memory-mapped
as they are: nothing is copied into memory or converted, and DataLoader workers share the
same page cache. Every shard under the configured directories, in path order, forms one
stream, as upstream reads them.
"""

from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .records import DataError

META = "meta.json"
TOKENS, POSITIONS, LOSS_MASK = "sequence", "position_ids", "loss_mask"
# dtypes upstream can write (torch dtype names) that numpy maps without conversion.
INTEGER_DTYPES = ("uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64")
READABLE = {TOKENS: INTEGER_DTYPES, POSITIONS: INTEGER_DTYPES, LOSS_MASK: ("bool", *INTEGER_DTYPES)}
REPREPROCESS = "preprocess the data again with upstream's scripts/tools/preprocess.py"


@dataclass(frozen=True)
class ShardFile:
    """One key's ``.bin`` file of one shard: where it is, its dtype and how many values it holds."""

    path: Path
    dtype: np.dtype
    length: int

    def open(self) -> np.memmap:
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.length,))


class ShardArray:
    """One key over every shard, read as one sequence: ``len`` and slices (step 1) that read only
    the pages they touch. ``segments`` are the read-only ``np.memmap`` of each file. Pickling
    (DataLoader workers under ``spawn``) sends the file names, not the data."""

    def __init__(self, files: list[ShardFile]) -> None:
        self.files = files
        self.segments = [f.open() for f in files if f.length]
        self.ends = list(np.cumsum([len(s) for s in self.segments], dtype=np.int64).tolist())

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice):
            raise TypeError(f"ShardArray takes slices, got {type(index).__name__}")
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise ValueError("ShardArray slices take step 1")
        pieces = []
        at = bisect.bisect_right(self.ends, start)
        while start < stop:
            first = self.ends[at - 1] if at else 0
            end = min(stop, self.ends[at])
            pieces.append(self.segments[at][start - first : end - first])
            start, at = end, at + 1
        if not pieces:
            return np.zeros(0, dtype=self.segments[0].dtype if self.segments else np.int64)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def __getstate__(self) -> dict[str, Any]:
        return {"files": self.files}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["files"])


@dataclass
class TokenShards:
    """The pre-training keys of a set of shards: tokens, and where present document starts
    (``positions`` == 0) and the loss mask."""

    origin: str
    tokens: ShardArray
    positions: ShardArray | None = None
    loss_mask: ShardArray | None = None


def has_shards(entry: str | os.PathLike) -> bool:
    """Whether ``entry`` is a directory holding upstream token shards (a ``meta.json`` in it or below)."""
    path = Path(entry).expanduser()
    return path.is_dir() and ((path / META).is_file() or next(path.rglob(META), None) is not None)


def _fail(meta: Path, field: str, problem: str) -> DataError:
    return DataError(f"{meta}: field {field!r} {problem}")


def _length(meta: Path, key: str, info: dict) -> int:
    shape = info.get("shape")
    if shape is None:
        raise _fail(meta, f"{key}.shape", f"is missing; {REPREPROCESS}")
    if not (isinstance(shape, list) and len(shape) == 1 and isinstance(shape[0], int) and shape[0] >= 0):
        raise _fail(meta, f"{key}.shape", f"must be [length] (one dimension, a whole number), got {shape!r}")
    return shape[0]


def _dtype(meta: Path, key: str, info: dict) -> np.dtype:
    name = info.get("dtype")
    if name is None:
        raise _fail(meta, f"{key}.dtype", f"is missing; {REPREPROCESS}")
    if name not in READABLE[key]:
        raise _fail(
            meta,
            f"{key}.dtype",
            f"is {name!r}, which cannot be read as {key}: use one of {', '.join(READABLE[key])} "
            f"(upstream's output.dtype) and {REPREPROCESS}",
        )
    return np.dtype(name).newbyteorder("<")


def _shard_file(meta: Path, key: str, info: Any) -> ShardFile:
    if not isinstance(info, dict):
        raise _fail(meta, key, f"must be {{'shape': [length], 'dtype': name}}, got {info!r}")
    length, dtype = _length(meta, key, info), _dtype(meta, key, info)
    path = meta.parent / f"{key}.bin"
    if not path.is_file():
        raise DataError(f"{path}: missing, but {meta} lists field {key!r}; {REPREPROCESS}")
    size, expected = path.stat().st_size, length * dtype.itemsize
    if size != expected:
        raise DataError(
            f"{path}: {size} bytes, but {meta} field '{key}.shape' = [{length}] of {dtype.name} needs {expected}; "
            f"the file is truncated or belongs to other data: {REPREPROCESS}"
        )
    return ShardFile(path, dtype, length)


def _read_meta(meta: Path) -> dict[str, Any]:
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{meta}: cannot read it as JSON ({e}); {REPREPROCESS}") from None
    if not isinstance(data, dict):
        raise DataError(f"{meta}: must map each key to {{'shape', 'dtype'}}, got {type(data).__name__}")
    if TOKENS not in data:
        raise _fail(
            meta,
            TOKENS,
            f"is missing (keys: {', '.join(data) or 'none'}); pre-training reads the token ids of "
            "'sequence', which upstream writes for text or chat data (input.sections), not for DPO/GRPO data",
        )
    return data


def shard_files(meta: Path) -> dict[str, ShardFile]:
    """The pre-training keys one shard has, checked against its ``meta.json``."""
    data = _read_meta(meta)
    files = {key: _shard_file(meta, key, data[key]) for key in (TOKENS, POSITIONS, LOSS_MASK) if key in data}
    for key, file in files.items():
        if file.length != files[TOKENS].length:
            raise _fail(
                meta,
                f"{key}.shape",
                f"is [{file.length}] but 'sequence.shape' is [{files[TOKENS].length}]; every key "
                f"has one value per token: {REPREPROCESS}",
            )
    return files


def open_shards(directories: list[Path], field: str) -> TokenShards:
    """Every shard under ``directories`` (in path order) as one memory-mapped stream."""
    metas = [m for d in directories for m in sorted(Path(d).expanduser().rglob(META))]
    shards = [(meta, shard_files(meta)) for meta in metas]
    keys = set(shards[0][1])
    for meta, files in shards:
        if set(files) != keys:
            odd = sorted(keys ^ set(files))[0]
            has, lacks = (meta, metas[0]) if odd in files else (metas[0], meta)
            raise _fail(
                lacks,
                odd,
                f"is missing while {has} has it; {field} shards must be preprocessed alike "
                "(same output.position_ids_mode, same masks)",
            )
    column = {key: ShardArray([files[key] for _, files in shards]) for key in keys}
    return TokenShards(", ".join(map(str, directories)), column[TOKENS], column.get(POSITIONS), column.get(LOSS_MASK))
