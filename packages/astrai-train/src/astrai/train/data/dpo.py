"""Preference data for DPO: a prompt, a preferred (``chosen``) and a worse (``rejected``) reply.

``prompt`` is a string (one user turn) or a message list ending with a user turn; ``chosen``
and ``rejected`` are strings (one assistant turn) or message lists (an assistant turn and
what follows; a full conversation repeating the prompt is accepted and cut after it). Without
``prompt``, ``chosen`` and ``rejected`` are two whole conversations (or texts) and their
shared start is the prompt (TRL's implicit-prompt format, upstream AstrAI's DPO rows; see
``preference``). Each side is rendered with the chat template as prompt + reply; labels cover
only the reply and its end-of-turn token, never the prompt. Optional ``ref_chosen_logps`` / ``ref_rejected_logps``
columns (precomputed reference log-probabilities) are passed through to the batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from datasets import Dataset, Features, Sequence, Value

from astrai.core.tokenizer import AutoTokenizer

from .base import TRUNCATED, BaseDataModule, Rows, per_row
from .collate import collate_dpo
from .preference import preference_pair
from .records import DataError, RecordError, optional_float
from .sft import OVERLONG, _chat, _pad_id, fit_length, sample_from_mask

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def _side(
    tok: AutoTokenizer,
    prompt: list[dict],
    prompt_ids: list[int],
    reply: list[dict],
    field: str,
    max_len: int,
    overlong: str,
) -> tuple[dict, bool]:
    ids, mask = _chat(tok, prompt + reply, field)
    if ids[: len(prompt_ids)] != prompt_ids:
        raise RecordError(
            field,
            "the chat template renders the prompt differently once a reply follows, "
            "so prompt and reply tokens cannot be told apart",
        )
    if len(prompt_ids) >= max_len:
        raise RecordError(
            "prompt", f"has {len(prompt_ids)} tokens, leaving no room for a reply within data.max_len={max_len}"
        )
    mask = [0] * len(prompt_ids) + mask[len(prompt_ids) :]  # earlier assistant turns are prompt too
    ids, mask, cut = fit_length(ids, mask, max_len, overlong, field)
    sample = sample_from_mask(ids, mask, field)
    return {f"{field}_input_ids": sample["input_ids"], f"{field}_labels": sample["labels"]}, cut


def _dpo_row(
    row: dict, tok: AutoTokenizer, *, max_len: int, overlong: str, system_prompt: str | None, with_refs: bool
) -> dict:
    prompt, chosen, rejected = preference_pair(row, system_prompt)
    prompt_ids = tok.apply_chat_template(prompt, add_generation_prompt=True)
    out, cut_c = _side(tok, prompt, prompt_ids, chosen, "chosen", max_len, overlong)
    more, cut_r = _side(tok, prompt, prompt_ids, rejected, "rejected", max_len, overlong)
    out.update(more)
    out[TRUNCATED] = cut_c or cut_r
    if with_refs:
        for name in REF_COLUMNS:
            if (value := optional_float(row.get(name), name)) is None:
                raise RecordError(name, "is missing (when the column exists, every row needs a value)")
            out[name] = value
    return out


def tokenize_pairs(rows: list[dict], tok: AutoTokenizer, **options: Any) -> list[dict | RecordError]:
    return per_row(_dpo_row, rows, tok, **options)


class DPODataModule(BaseDataModule):
    """Preference batches: ``{chosen,rejected}_{input_ids,labels,attention_mask}`` (B, T), both
    sides padded to one length, plus ``ref_{chosen,rejected}_logps`` (B,) when the data has them.

    Args:
        max_len: most tokens of prompt + reply on each side.
        overlong: a side over ``max_len``: ``truncate`` (cut the reply's end; counted and logged)
            or ``error`` (stop, or skip and count with ``skip_bad_rows``).
        system_prompt: system turn put before string prompts (given, or the shared start of two texts).
        **kwargs: the options shared by all data modules (see ``BaseDataModule``).
    """

    columns_hint = (
        "DPO rows need 'chosen' and 'rejected' (replies after a 'prompt', or without 'prompt' two whole "
        "conversations that start with the same prompt)"
    )

    def __init__(
        self,
        tokenizer: str,
        train: str | list[str],
        max_len: int = 1024,
        overlong: str = "truncate",
        system_prompt: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(tokenizer, train, **kwargs)
        if not isinstance(max_len, int) or max_len < 2:
            raise DataError(f"data.max_len must be an integer >= 2, got {max_len!r}")
        if overlong not in OVERLONG:
            raise DataError(f"data.overlong must be one of {', '.join(OVERLONG)}, got {overlong!r}")
        self.max_len, self.overlong, self.system_prompt = max_len, overlong, system_prompt

    def check_columns(self, columns: list[str], origin: str) -> None:
        self._require(columns, ["chosen", "rejected"], origin)
        refs = [c for c in REF_COLUMNS if c in columns]
        if len(refs) == 1:
            self._require(columns, list(REF_COLUMNS), origin)

    def converter(self, columns: list[str]) -> tuple[Callable, dict[str, Any], Features]:
        with_refs = all(c in columns for c in REF_COLUMNS)
        features = {
            f"{side}_{key}": Sequence(Value("int32"))
            for side in ("chosen", "rejected")
            for key in ("input_ids", "labels")
        }
        features[TRUNCATED] = Value("bool")
        if with_refs:
            features.update({name: Value("float64") for name in REF_COLUMNS})
        options = {
            "max_len": self.max_len,
            "overlong": self.overlong,
            "system_prompt": self.system_prompt,
            "with_refs": with_refs,
        }
        return tokenize_pairs, options, Features(features)

    def to_torch(self, ds: Dataset, split: str) -> Rows:
        return Rows(ds)

    def collate_fn(self) -> Callable[[list[dict]], dict]:
        return functools.partial(collate_dpo, pad_id=_pad_id(self.tokenizer))
