"""GRPO data: prompts to roll out (online), or prompts with scored responses (offline).

Online rows have a ``prompt`` (a string, or a message list ending with a user turn) and any
other columns the reward functions read (``answer``, ``reference``, ...). Batches hold the
prompt's token ids, rendered with the chat template up to the assistant's turn, and the whole
row (every column, as loaded) for the rewards:

    {"prompt_ids": [[int]], "prompts": [str | messages], "rows": [dict]}

Offline rows add ``responses`` (G replies, strings) and ``rewards`` (G numbers): the model
trains on them without generating, as the original AstrAI GRPO data did. Batches are flat,
one sequence per response, with its group (its prompt) in ``group_ids``:

    input_ids, labels, attention_mask (N, T); rewards (N,); group_ids (N,)

labels cover the response and its end-of-turn token only. Validation and test rows are always
served as prompts: validation generates and scores completions with the model's rewards.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from typing import Any

import pyarrow.compute as pc
import torch
from datasets import Dataset, Features, Sequence, Value

from astrai.core.tokenizer import AutoTokenizer

from .base import TRUNCATED, BaseDataModule, Rows, per_row
from .collate import IGNORE, _attention_mask, _pad, shifted_labels
from .records import DataError, RecordError, prompt_messages, require_text
from .sft import OVERLONG, _chat, _pad_id

OFFLINE_COLUMNS = ("responses", "rewards")
FEATURES = Features(
    {
        "prompt_ids": Sequence(Value("int32")),
        "completion_ids": Sequence(Sequence(Value("int32"))),  # offline only (else empty)
        "rewards": Sequence(Value("float64")),  # offline only (else empty)
        "row": Value("string"),  # the original row as JSON, for the reward functions
        TRUNCATED: Value("bool"),
    }
)


def _prompt(row: dict, tok: AutoTokenizer, max_prompt_len: int, system_prompt: str | None) -> tuple[list, list[int]]:
    messages = prompt_messages(row.get("prompt"), "prompt", system_prompt)
    try:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    except ValueError as e:  # the template rejected the conversation
        raise RecordError("prompt", str(e)) from None
    if len(ids) > max_prompt_len:
        raise RecordError(
            "prompt",
            f"has {len(ids)} tokens, more than data.max_prompt_len={max_prompt_len} (raise it, or shorten the prompt)",
        )
    return messages, ids


def _response(
    tok: AutoTokenizer, messages: list, prompt_ids: list[int], text: Any, field: str, max_len: int, overlong: str
) -> tuple[list[int], bool]:
    """Token ids of one reply after the prompt: its content and end-of-turn token, as the engine
    would have generated them (the template's trailing newline is not part of it)."""
    reply = require_text(text, field)
    ids, mask = _chat(tok, [*messages, {"role": "assistant", "content": reply}], field)
    if ids[: len(prompt_ids)] != prompt_ids:
        raise RecordError(
            field,
            "the chat template renders the prompt differently once a reply follows, "
            "so prompt and reply tokens cannot be told apart",
        )
    reply_mask = mask[len(prompt_ids) :]
    if 1 not in reply_mask:
        raise RecordError(field, "renders to no reply tokens")
    end = len(reply_mask) - reply_mask[::-1].index(1)
    completion = ids[len(prompt_ids) : len(prompt_ids) + end]
    room = max_len - len(prompt_ids)
    if len(completion) <= room:
        return completion, False
    if overlong == "error" or room < 1:
        raise RecordError(
            field,
            f"prompt + reply have {len(prompt_ids) + len(completion)} tokens, more than "
            f"data.max_len={max_len} (raise data.max_len or set data.overlong: truncate)",
        )
    return completion[:room], True


def _grpo_row(
    row: dict,
    tok: AutoTokenizer,
    *,
    max_prompt_len: int,
    max_len: int,
    overlong: str,
    system_prompt: str | None,
    offline: bool,
) -> dict:
    messages, prompt_ids = _prompt(row, tok, max_prompt_len, system_prompt)
    out = {
        "prompt_ids": prompt_ids,
        "completion_ids": [],
        "rewards": [],
        TRUNCATED: False,
        "row": json.dumps(row, ensure_ascii=False, default=str),
    }
    if not offline:
        return out
    responses, rewards = row.get("responses"), row.get("rewards")
    if not isinstance(responses, list) or len(responses) < 2:
        raise RecordError("responses", f"must be a list of at least 2 replies to compare, got {responses!r:.80}")
    if not isinstance(rewards, list) or len(rewards) != len(responses):
        raise RecordError(
            "rewards", f"must be a list of {len(responses)} numbers, one per response, got {rewards!r:.80}"
        )
    for i, value in enumerate(rewards):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RecordError(f"rewards[{i}]", f"must be a finite number, got {value!r}")
    for i, text in enumerate(responses):
        ids, cut = _response(tok, messages, prompt_ids, text, f"responses[{i}]", max_len, overlong)
        out["completion_ids"].append(ids)
        out[TRUNCATED] = out[TRUNCATED] or cut
    out["rewards"] = [float(v) for v in rewards]
    return out


def tokenize_grpo(rows: list[dict], tok: AutoTokenizer, **options: Any) -> list[dict | RecordError]:
    return per_row(_grpo_row, rows, tok, **options)


# ---- batches ------------------------------------------------------------------------------------


def collate_prompts(rows: list[dict]) -> dict[str, list]:
    """Online batch: prompt token ids plus the original rows (for the reward functions)."""
    originals = [json.loads(r["row"]) for r in rows]
    return {
        "prompt_ids": [list(r["prompt_ids"]) for r in rows],
        "prompts": [o.get("prompt") for o in originals],
        "rows": originals,
    }


def collate_offline(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Offline batch: one right-padded sequence (prompt + response) per response."""
    seqs, labels, rewards, groups = [], [], [], []
    for g, r in enumerate(rows):
        prompt = list(r["prompt_ids"])
        for completion, reward in zip(r["completion_ids"], r["rewards"]):
            ids = prompt + list(completion)
            seqs.append(ids)
            labels.append(shifted_labels(ids, [0] * len(prompt) + [1] * len(completion)))
            rewards.append(reward)
            groups.append(g)
    length = max(map(len, seqs))
    return {
        "input_ids": _pad(seqs, pad_id, length),
        "labels": _pad(labels, IGNORE, length),
        "attention_mask": _attention_mask(seqs, length),
        "rewards": torch.tensor(rewards, dtype=torch.float32),
        "group_ids": torch.tensor(groups),
    }


def collate_grpo(rows: list[dict], pad_id: int) -> dict:
    return collate_offline(rows, pad_id) if rows[0]["completion_ids"] else collate_prompts(rows)


class PromptRows(torch.utils.data.Dataset):
    """Rows served as prompts only (validation and test generate their own completions)."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds.remove_columns(["completion_ids", "rewards"])

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> dict:
        return {**self.ds[index], "completion_ids": [], "rewards": []}


class GRPODataModule(BaseDataModule):
    """Prompts for online GRPO, or prompts with scored responses for offline GRPO (see module docstring).

    The format is taken from the columns: ``responses`` and ``rewards`` make the training rows
    offline. Every training file must have the same format.

    Args:
        max_prompt_len: most tokens in a rendered prompt; a longer prompt is a bad row.
        max_len: offline only: most tokens of prompt + response.
        overlong: offline only: a response over ``max_len``: ``truncate`` (cut its end; counted
            and logged) or ``error`` (stop, or skip and count with ``skip_bad_rows``).
        system_prompt: system turn put before string prompts.
        **kwargs: the options shared by all data modules (see ``BaseDataModule``); ``batch_size``
            counts prompts (each gives a group of completions).
    """

    columns_hint = (
        "GRPO rows need 'prompt' (online), or 'prompt', 'responses' and 'rewards' (offline); "
        "other columns are passed to the reward functions"
    )

    def __init__(
        self,
        tokenizer: str,
        train: str | list[str],
        max_prompt_len: int = 512,
        max_len: int = 1024,
        overlong: str = "truncate",
        system_prompt: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(tokenizer, train, **kwargs)
        for name, value in (("max_prompt_len", max_prompt_len), ("max_len", max_len)):
            if not isinstance(value, int) or value < 1:
                raise DataError(f"data.{name} must be a positive integer, got {value!r}")
        if overlong not in OVERLONG:
            raise DataError(f"data.overlong must be one of {', '.join(OVERLONG)}, got {overlong!r}")
        self.max_prompt_len, self.max_len, self.overlong = max_prompt_len, max_len, overlong
        self.system_prompt = system_prompt
        self.offline: bool | None = None  # known after build(): the training rows' format

    def check_columns(self, columns: list[str], origin: str) -> None:
        self._require(columns, ["prompt"], origin)
        present = [c for c in OFFLINE_COLUMNS if c in columns]
        if len(present) == 1:
            self._require(columns, list(OFFLINE_COLUMNS), origin)

    def converter(self, columns: list[str]) -> tuple[Callable, dict[str, Any], Features]:
        options = {
            "max_prompt_len": self.max_prompt_len,
            "max_len": self.max_len,
            "overlong": self.overlong,
            "system_prompt": self.system_prompt,
            "offline": all(c in columns for c in OFFLINE_COLUMNS),
        }
        return tokenize_grpo, options, FEATURES

    def build(self) -> None:
        if self._built:
            return
        super().build()
        ds = self.train_dataset.ds
        n_offline = _count_offline(ds)
        if 0 < n_offline < len(ds):
            raise DataError(
                f"data.train mixes {n_offline} offline rows (with responses and rewards) and "
                f"{len(ds) - n_offline} prompt-only rows; train on one kind at a time"
            )
        self.offline = n_offline > 0

    def to_torch(self, ds: Dataset, split: str) -> torch.utils.data.Dataset:
        return Rows(ds) if split == "train" else PromptRows(ds)

    def collate_fn(self) -> Callable[[list[dict]], dict]:
        return functools.partial(collate_grpo, pad_id=_pad_id(self.tokenizer))


def _count_offline(ds: Dataset) -> int:
    lengths = pc.list_value_length(ds.with_format("arrow")[:]["rewards"]).to_numpy()
    return int((lengths > 0).sum())
