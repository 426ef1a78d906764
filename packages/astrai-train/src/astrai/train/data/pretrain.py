"""Pre-training data: documents -> one token stream -> fixed-length windows.

Each document is tokenised once (cached ``datasets.map``) and followed by EOS; the split's
documents are concatenated into a flat token file next to the ``datasets`` cache (memory-mapped,
so a corpus larger than RAM is fine). Window ``i`` starts at ``min(i * stride, N - 1 - seq_len)``
of the ``N``-token stream and holds ``seq_len + 1`` tokens: inputs are the first ``seq_len``,
labels the last ``seq_len``. The last window is pulled back to end at the stream's end, so no
tail is lost and every window is full.

A directory of upstream AstrAI's preprocessed token shards (``meta.json`` + ``.bin``, see
``shards``) is read as the stream instead, memory-mapped in place: its tokens are already
ids, its ``position_ids`` mark where documents start and its ``loss_mask``, if any, is kept.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
from datasets import Dataset, Features, Sequence, Value

from astrai.core.integrity import atomic_write
from astrai.core.tokenizer import AutoTokenizer

from .base import BaseDataModule, per_row
from .collate import IGNORE, collate_windows
from .records import DataError, RecordError, require_text
from .shards import TokenShards, has_shards, open_shards


def _one_text(row: dict, tok: AutoTokenizer, *, text_field: str) -> str:
    return require_text(row.get(text_field), text_field, allow_empty=True)


def tokenize_documents(
    rows: list[dict], tok: AutoTokenizer, *, text_field: str, eos_id: int
) -> list[dict | RecordError]:
    """Check each row's text, then encode the good ones in one batch call (Rust threads).
    An empty document adds nothing to the stream (not even EOS)."""
    checked = per_row(_one_text, rows, tok, text_field=text_field)
    encoded = iter(tok.encode_batch([c for c in checked if isinstance(c, str)]))
    out: list[dict | RecordError] = []
    for c in checked:
        if isinstance(c, RecordError):
            out.append(c)
        else:
            doc = next(encoded)
            out.append({"input_ids": [*doc, eos_id] if doc else []})
    return out


def window_starts(n_tokens: int, seq_len: int, stride: int) -> int:
    """Number of windows of ``seq_len + 1`` tokens over a stream of ``n_tokens`` (see module doc)."""
    return math.ceil((n_tokens - 1 - seq_len) / stride) + 1


class TokenWindows(torch.utils.data.Dataset):
    """Windows over a token stream (an array, or any object with ``len`` and slices).

    With document attention, positions restart at each document start, so attention stays
    inside a document, and the last token of a document predicts nothing. Documents start
    after each ``eos_id`` token, or where ``positions`` (stored position ids) is 0.
    ``loss_mask`` (one value per token, 0 = not trained) removes the targets it marks.
    """

    def __init__(
        self,
        tokens: Any,
        seq_len: int,
        stride: int,
        eos_id: int | None = None,
        split: str = "train",
        positions: Any = None,
        loss_mask: Any = None,
    ) -> None:
        if len(tokens) < seq_len + 1:
            raise DataError(
                f"the {split} data has {len(tokens)} tokens, fewer than data.seq_len + 1 = {seq_len + 1}; "
                "lower data.seq_len or add text"
            )
        self.tokens, self.seq_len, self.stride, self.eos_id = tokens, seq_len, stride, eos_id
        self.positions, self.loss_mask = positions, loss_mask
        self.count = window_starts(len(tokens), seq_len, stride)

    def __len__(self) -> int:
        return self.count

    def start(self, index: int) -> int:
        return min(index * self.stride, len(self.tokens) - 1 - self.seq_len)

    def _document_starts(self, chunk: torch.Tensor, begin: int) -> torch.Tensor | None:
        """Whether each token of the window's ``seq_len + 1`` starts a document (None: no documents)."""
        if self.positions is not None:
            return torch.from_numpy(self.positions[begin : begin + self.seq_len + 1] == 0)
        if self.eos_id is not None:
            return torch.cat([torch.zeros(1, dtype=torch.bool), chunk[:-1] == self.eos_id])
        return None

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.count:
            raise IndexError(index)
        begin = self.start(index)
        chunk = torch.from_numpy(self.tokens[begin : begin + self.seq_len + 1].astype(np.int64))
        item = {"input_ids": chunk[:-1], "labels": chunk[1:].clone()}
        if self.loss_mask is not None:
            item["labels"][torch.from_numpy(self.loss_mask[begin + 1 : begin + self.seq_len + 1] == 0)] = IGNORE
        starts = self._document_starts(chunk, begin)
        if starts is not None:
            t = torch.arange(self.seq_len)
            is_start = starts[:-1].clone()
            is_start[0] = True
            # Position = distance from the latest document start at or before t.
            latest_start = torch.where(is_start, t, torch.zeros_like(t)).cummax(0).values
            item["position_ids"] = t - latest_start
            item["labels"][starts[1:]] = IGNORE  # the next token begins another document
        return item


def _stream_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


def _write_stream(ds: Dataset, path: Path, dtype: np.dtype) -> None:
    """Atomic, through a uniquely named temporary file: a half-written file is never read, and
    two nodes filling one shared cache at once (their process ids may be equal) never share one."""

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            for batch in ds.with_format("arrow").iter(batch_size=16384):
                f.write(pc.list_flatten(batch["input_ids"]).to_numpy(zero_copy_only=False).astype(dtype).tobytes())

    atomic_write(path, write)


def token_stream(ds: Dataset, vocab_size: int) -> np.ndarray:
    """All tokens of ``ds`` in row order: memory-mapped from a file beside the ``datasets``
    cache (written once per dataset fingerprint), or in memory for an in-memory dataset."""
    dtype = _stream_dtype(vocab_size)
    if not ds.cache_files:
        column = ds.with_format("arrow")[:]["input_ids"]
        return pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(dtype)
    path = Path(ds.cache_files[0]["filename"]).parent / f"astrai-tokens-{ds._fingerprint}-{dtype.name}.bin"
    if not path.exists():
        _write_stream(ds, path, dtype)
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def shard_directories(spec: Any, field: str) -> list[Path] | None:
    """The directories of ``spec`` when they hold token shards, None when it names rows."""
    entries = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    sharded = [has_shards(e) if isinstance(e, (str, os.PathLike)) else False for e in entries]
    if not any(sharded):
        return None
    if not all(sharded):
        shard, other = entries[sharded.index(True)], entries[sharded.index(False)]
        raise DataError(
            f"{field}: {shard} holds token shards (meta.json + .bin) but {other} does not; "
            "one split reads either token shards or text rows, not both"
        )
    return [Path(e).expanduser() for e in entries]


class PretrainDataModule(BaseDataModule):
    """Next-token prediction over windows of a document stream (see module docstring).

    Rows need a text column (``text_field``); or ``train`` / ``val`` / ``test`` name directories
    of upstream AstrAI token shards (detected by their ``meta.json``). Batches:
    ``input_ids``/``labels`` (B, seq_len), plus ``position_ids`` with ``document_attention``.

    Args:
        seq_len: tokens per training window (the model's context in training).
        stride: distance between window starts; ``seq_len`` (default) makes windows that share
            only their boundary token, smaller values make them overlap. Validation and test
            windows always use ``seq_len``.
        text_field: the column holding each document's text.
        document_attention: keep attention inside each document (positions restart after EOS,
            or, in token shards with ``position_ids``, where those restart).
        **kwargs: the options shared by all data modules (see ``BaseDataModule``).
    """

    columns_hint = "pre-training rows need a text column (data.text_field)"

    def __init__(
        self,
        tokenizer: str,
        train: str | list[str],
        seq_len: int = 512,
        stride: int | None = None,
        text_field: str = "text",
        document_attention: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(tokenizer, train, **kwargs)
        for name, value in (("seq_len", seq_len), ("stride", seq_len if stride is None else stride)):
            if not isinstance(value, int) or value < 1:
                raise DataError(f"data.{name} must be a positive integer, got {value!r}")
        self.seq_len = seq_len
        self.stride = seq_len if stride is None else stride
        self.text_field = text_field
        self.document_attention = document_attention

    def check_columns(self, columns: list[str], origin: str) -> None:
        self._require(columns, [self.text_field], origin)

    def converter(self, columns: list[str]) -> tuple[Callable, dict[str, Any], Features]:
        eos = self.tokenizer.eos_token_id
        return (
            tokenize_documents,
            {"text_field": self.text_field, "eos_id": eos},
            Features({"input_ids": Sequence(Value("int32"))}),
        )

    def _tokenized(self, spec: Any, split: str) -> Dataset | TokenShards:
        directories = shard_directories(spec, f"data.{split}")
        if directories is None:
            return super()._tokenized(spec, split)
        if split == "train" and self.val_spec is None and self.val_fraction:
            raise DataError(
                "data.val_fraction cannot hold out rows of token shards (they have no rows); "
                "give data.val a directory of validation shards, or set data.val_fraction: 0"
            )
        return open_shards(directories, f"data.{split}")

    def to_torch(self, ds: Dataset | TokenShards, split: str) -> TokenWindows:
        stride = self.stride if split == "train" else self.seq_len
        eos = self.tokenizer.eos_token_id if self.document_attention else None
        if not isinstance(ds, TokenShards):
            tokens = token_stream(ds, self.tokenizer.vocab_size)
            return TokenWindows(tokens, self.seq_len, stride, eos_id=eos, split=split)
        positions = ds.positions if self.document_attention else None
        return TokenWindows(
            ds.tokens,
            self.seq_len,
            stride,
            eos_id=None if positions is not None else eos,
            split=split,
            positions=positions,
            loss_mask=ds.loss_mask,
        )

    def collate_fn(self) -> Callable[[list[dict]], dict]:
        return functools.partial(collate_windows)
