"""Supervised fine-tuning data: chat conversations, loss only on the assistant's replies.

A row is either ``messages`` (a list of ``{"role", "content"}``) or ``prompt`` + ``response``
strings (one user turn, one reply). The conversation is rendered with the tokenizer's chat
template; trainable tokens are each assistant reply and its end-of-turn token
(``AutoTokenizer.chat_assistant_mask``), shifted into ``labels`` (see ``collate``).

Batches are padded (one sample a row) or, with ``packing``, rows hold several whole samples:
``position_ids`` restart at 0 at each sample, so the model's attention never crosses from
one sample into another, and a sample's last position has no label, so no target ever
belongs to the next sample. Samples are never split across rows: a sample longer than
``max_len`` is truncated (counted and logged) or, with ``overlong: error``, reported.
"""

from __future__ import annotations

import bisect
import functools
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
from datasets import Dataset, Features, Sequence, Value

from astrai.core.tokenizer import AutoTokenizer

from .base import TRUNCATED, BaseDataModule, Rows, per_row
from .collate import IGNORE, collate_lm, shifted_labels
from .records import DataError, RecordError, require_messages, require_text

OVERLONG = ("truncate", "error")


def fit_length(
    ids: list[int], mask: list[int], max_len: int, overlong: str, field: str
) -> tuple[list[int], list[int], bool]:
    """Cut a sample to ``max_len`` tokens, or raise under ``overlong: error``."""
    if len(ids) <= max_len:
        return ids, mask, False
    if overlong == "error":
        raise RecordError(
            field,
            f"has {len(ids)} tokens, more than data.max_len={max_len} "
            "(raise data.max_len or set data.overlong: truncate)",
        )
    return ids[:max_len], mask[:max_len], True


def sample_from_mask(ids: list[int], mask: list[int], field: str) -> dict[str, Any]:
    labels = shifted_labels(ids, mask)
    if all(label == IGNORE for label in labels):
        raise RecordError(field, "has no reply tokens left to train on within data.max_len")
    return {"input_ids": ids, "labels": labels}


def _chat(tok: AutoTokenizer, messages: list[dict], field: str, tools: Any = None) -> tuple[list[int], list[int]]:
    try:
        return tok.chat_assistant_mask(messages, **({"tools": tools} if tools else {}))
    except ValueError as e:  # the template rejected the conversation
        raise RecordError(field, str(e)) from None


def _row_tools(tools: Any) -> list | None:
    """A row's tools (rendered as the server renders a request's), a list or its JSON text: a
    JSON string keeps datasets from merging different functions' schemas into one Arrow type."""
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise RecordError("tools", f"is not valid JSON: {e}") from None
    if tools is not None and not isinstance(tools, list):
        raise RecordError("tools", f"must be a list of functions (or its JSON text), got {type(tools).__name__}")
    return tools


def _sft_row(row: dict, tok: AutoTokenizer, *, max_len: int, overlong: str, system_prompt: str | None) -> dict:
    if "messages" in row:
        field, messages = "messages", require_messages(row["messages"], "messages")
    else:
        field = "response"
        prompt, response = require_text(row.get("prompt"), "prompt"), require_text(row.get("response"), "response")
        system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages = [*system, {"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    ids, mask = _chat(tok, messages, field, _row_tools(row.get("tools")))
    ids, mask, cut = fit_length(ids, mask, max_len, overlong, field)
    return {**sample_from_mask(ids, mask, field), TRUNCATED: cut}


def tokenize_chats(rows: list[dict], tok: AutoTokenizer, **options: Any) -> list[dict | RecordError]:
    return per_row(_sft_row, rows, tok, **options)


def pack(lengths: list[int] | np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing: sample indices per row, each row's lengths summing to at
    most ``capacity``. Longest samples first, each into the fullest row it still fits;
    deterministic (ties keep index order)."""
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row id), sorted
    for i in order:
        size = int(lengths[i])
        if size > capacity:
            raise ValueError(f"sample {i} has {size} tokens, more than the row capacity {capacity}")
        at = bisect.bisect_left(free, (size, -1))
        if at == len(free):
            rows.append([i])
            space, row = capacity - size, len(rows) - 1
        else:
            space, row = free.pop(at)
            rows[row].append(i)
            space -= size
        bisect.insort(free, (space, row))
    return rows


class PackedSamples(torch.utils.data.Dataset):
    """Rows of several whole samples with restarting ``position_ids`` (see module docstring)."""

    def __init__(self, ds: Dataset, max_len: int) -> None:
        lengths = pc.list_value_length(ds.with_format("arrow")[:]["input_ids"]).to_numpy()
        self.ds, self.rows = ds, pack(lengths, max_len)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        samples = self.ds[self.rows[index]]
        row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
        for ids, labels in zip(samples["input_ids"], samples["labels"]):
            row["input_ids"] += ids
            row["labels"] += labels
            row["position_ids"] += range(len(ids))
        return row


class SFTDataModule(BaseDataModule):
    """Chat fine-tuning batches: ``input_ids``, ``labels``, ``attention_mask`` (B, T), plus
    ``position_ids`` when packed (see module docstring).

    Args:
        max_len: most tokens in a sample (padded) or in a row of samples (packed).
        packing: put several whole samples in each row (fewer pad tokens, same loss).
        overlong: what to do with a sample over ``max_len``: ``truncate`` (cut its end; counted
            and logged) or ``error`` (stop, or skip and count with ``skip_bad_rows``).
        system_prompt: system turn put before ``prompt``/``response`` rows (not ``messages``).
        **kwargs: the options shared by all data modules (see ``BaseDataModule``).
    """

    columns_hint = "SFT rows need 'messages' (a list of {role, content}) or 'prompt' and 'response'"

    def __init__(
        self,
        tokenizer: str,
        train: str | list[str],
        max_len: int = 1024,
        packing: bool = False,
        overlong: str = "truncate",
        system_prompt: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(tokenizer, train, **kwargs)
        if not isinstance(max_len, int) or max_len < 2:
            raise DataError(f"data.max_len must be an integer >= 2, got {max_len!r}")
        if overlong not in OVERLONG:
            raise DataError(f"data.overlong must be one of {', '.join(OVERLONG)}, got {overlong!r}")
        self.max_len, self.packing, self.overlong, self.system_prompt = max_len, packing, overlong, system_prompt

    def check_columns(self, columns: list[str], origin: str) -> None:
        if "messages" not in columns:
            self._require(
                columns,
                ["prompt", "response"] if "prompt" in columns or "response" in columns else ["messages"],
                origin,
            )

    def converter(self, columns: list[str]) -> tuple[Callable, dict[str, Any], Features]:
        options = {"max_len": self.max_len, "overlong": self.overlong, "system_prompt": self.system_prompt}
        features = Features(
            {"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")), TRUNCATED: Value("bool")}
        )
        return tokenize_chats, options, features

    def to_torch(self, ds: Dataset, split: str) -> torch.utils.data.Dataset:
        return PackedSamples(ds, self.max_len) if self.packing else Rows(ds)

    def collate_fn(self) -> Callable[[list[dict]], dict]:
        return functools.partial(collate_lm, pad_id=_pad_id(self.tokenizer))


def _pad_id(tok: AutoTokenizer) -> int:
    # Padding positions are masked everywhere; any id works, the pad token is the tidy choice.
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
