"""Turning a caller's prompt and SamplingParams into a Request, or a ValueError that says why not.

Everything is checked here, in the caller's thread, so bad input never reaches a batch.
"""

from __future__ import annotations

import dataclasses
import itertools
import uuid

import torch

from ..errors import AstraiError, require
from .params import SamplingParams
from .sequence import Request


class RequestIntake:
    def __init__(
        self,
        tokenizer,
        vocab_size: int,
        max_model_len: int,
        max_batch_size: int,
        eos_ids: frozenset[int],
        device: torch.device,
        grammars=None,
    ):
        self.grammars = grammars  # structured_output.Grammars: checks a constraint before it is queued
        self.tokenizer, self.vocab_size, self.max_model_len = tokenizer, vocab_size, max_model_len
        self.max_batch_size, self.eos_ids, self.device = max_batch_size, eos_ids, device
        self._ids = itertools.count()

    def build(self, prompt, params: SamplingParams | None, request_id: str | None, sink=None) -> Request:
        if params is None:
            params = SamplingParams()
        if not isinstance(params, SamplingParams):
            raise AstraiError(f"params must be a SamplingParams, got {type(params).__name__}")
        params = dataclasses.replace(params).validate()  # a private copy, normalised
        ids, text = self.prompt_ids(prompt)
        if len(ids) >= self.max_model_len:
            raise AstraiError(
                f"prompt has {len(ids)} tokens but max_model_len is {self.max_model_len}, which "
                "leaves no room to generate; shorten the prompt or raise max_model_len"
            )
        if params.structured_output is not None and self.grammars is not None:
            self.grammars.grammar(params.structured_output)
        if params.stop_strings and self.tokenizer is None:
            raise AstraiError("SamplingParams.stop needs a tokenizer; pass stop_token_ids instead")
        bad = [t for t in params.stop_token_ids or () if t >= self.vocab_size]
        require(
            not bad, "SamplingParams.stop_token_ids", f"has ids {bad} outside the vocabulary (size {self.vocab_size})"
        )
        require(
            params.prompt_logprobs is None or params.prompt_logprobs <= self.vocab_size,
            "SamplingParams.prompt_logprobs",
            f"asks for {params.prompt_logprobs} alternatives but the vocabulary has {self.vocab_size} tokens",
        )
        if params.logprobs is not None:
            require(
                params.logprobs <= self.vocab_size,
                "SamplingParams.logprobs",
                f"asks for {params.logprobs} alternatives but the vocabulary has {self.vocab_size} tokens",
            )
        require(
            params.n <= self.max_batch_size,
            "SamplingParams.n",
            f"({params.n}) exceeds the engine's max_batch_size ({self.max_batch_size})",
        )
        if request_id is None:
            request_id = f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        require(
            isinstance(request_id, str) and request_id, "request_id", f"must be a non-empty string, got {request_id!r}"
        )
        room = self.max_model_len - len(ids)
        return Request(
            request_id=request_id,
            prompt=text,
            prompt_token_ids=ids,
            params=params,
            arrival=0,
            max_tokens=min(params.max_tokens or room, room),
            sample_seeds=_sample_seeds(params),
            eos_ids=self.eos_ids,
            sink=sink,
        )

    def prompt_ids(self, prompt) -> tuple[list[int], str | None]:
        """Token ids of a prompt (a string is encoded with the tokenizer's special tokens) and its text."""
        if isinstance(prompt, str):
            if not prompt:
                raise AstraiError("prompt is empty; give some text or token ids")
            if self.tokenizer is None:
                raise AstraiError("prompt is a string but the engine has no tokenizer; pass token ids")
            return self.tokenizer.encode(prompt, add_special_tokens=True), prompt
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)) or not all(is_token_id(t) for t in prompt):
            raise AstraiError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not prompt:
            raise AstraiError("prompt is empty; give some text or token ids")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise AstraiError(f"prompt has token ids {bad[:5]} outside the vocabulary [0, {self.vocab_size})")
        return list(prompt), None


def _sample_seeds(params: SamplingParams) -> list[int | None]:
    """One key per sample when seeded: sample 0 uses the seed itself, sample i a mix of both."""
    if params.seed is None:
        return [None] * params.n
    return [(params.seed if i == 0 else hash((params.seed, i))) & 0xFFFF_FFFF_FFFF_FFFF for i in range(params.n)]


def is_token_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
