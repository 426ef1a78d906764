"""Pre-training data: documents -> one token stream -> fixed-length windows.

Each document is tokenised once (cached ``datasets.map``) and followed by EOS; the split's
documents are concatenated into a flat token file next to the ``datasets`` cache (memory-mapped,
so a corpus larger than RAM is fine). Window ``i`` starts at ``min(i * stride, N - 1 - seq_len)``
of the ``N``-token stream and holds ``seq_len + 1`` tokens: inputs are the first ``seq_len``,
labels the last ``seq_len``. The last window is pulled back to end at the stream's end, so no
tail is lost and every window is full.
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

from astrai.core.tokenizer import AutoTokenizer

from .base import BaseDataModule, per_row
from .collate import IGNORE, collate_windows
from .records import DataError, RecordError, require_text


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
    """Windows over a token stream. With ``eos_id`` set (document attention), positions
    restart after each EOS, so attention stays inside a document, and EOS predicts nothing."""

    def __init__(
        self, tokens: np.ndarray, seq_len: int, stride: int, eos_id: int | None = None, split: str = "train"
    ) -> None:
        if len(tokens) < seq_len + 1:
            raise DataError(
                f"the {split} data has {len(tokens)} tokens, fewer than data.seq_len + 1 = {seq_len + 1}; "
                "lower data.seq_len or add text"
            )
        self.tokens, self.seq_len, self.stride, self.eos_id = tokens, seq_len, stride, eos_id
        self.count = window_starts(len(tokens), seq_len, stride)

    def __len__(self) -> int:
        return self.count

    def start(self, index: int) -> int:
        return min(index * self.stride, len(self.tokens) - 1 - self.seq_len)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.count:
            raise IndexError(index)
        begin = self.start(index)
        chunk = torch.from_numpy(self.tokens[begin : begin + self.seq_len + 1].astype(np.int64))
        item = {"input_ids": chunk[:-1], "labels": chunk[1:].clone()}
        if self.eos_id is not None:
            ids = item["input_ids"]
            t = torch.arange(self.seq_len)
            is_start = torch.zeros(self.seq_len, dtype=torch.bool)
            is_start[0] = True
            is_start[1:] = ids[:-1] == self.eos_id
            # Position = distance from the latest document start at or before t.
            latest_start = torch.where(is_start, t, torch.zeros_like(t)).cummax(0).values
            item["position_ids"] = t - latest_start
            item["labels"][ids == self.eos_id] = IGNORE
        return item


def _stream_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


def _write_stream(ds: Dataset, path: Path, dtype: np.dtype) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with tmp.open("wb") as f:
        for batch in ds.with_format("arrow").iter(batch_size=16384):
            f.write(pc.list_flatten(batch["input_ids"]).to_numpy(zero_copy_only=False).astype(dtype).tobytes())
    os.replace(tmp, path)  # atomic: a half-written file is never read


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


class PretrainDataModule(BaseDataModule):
    """Next-token prediction over windows of a document stream (see module docstring).

    Rows need a text column (``text_field``). Batches: ``input_ids``/``labels`` (B, seq_len),
    plus ``position_ids`` with ``document_attention``.

    Args:
        seq_len: tokens per training window (the model's context in training).
        stride: distance between window starts; ``seq_len`` (default) makes windows that share
            only their boundary token, smaller values make them overlap. Validation and test
            windows always use ``seq_len``.
        text_field: the column holding each document's text.
        document_attention: keep attention inside each document (positions restart after EOS).
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

    def to_torch(self, ds: Dataset, split: str) -> TokenWindows:
        tokens = token_stream(ds, self.tokenizer.vocab_size)
        stride = self.stride if split == "train" else self.seq_len
        eos = self.tokenizer.eos_token_id if self.document_attention else None
        return TokenWindows(tokens, self.seq_len, stride, eos_id=eos, split=split)

    def collate_fn(self) -> Callable[[list[dict]], dict]:
        return functools.partial(collate_windows)
