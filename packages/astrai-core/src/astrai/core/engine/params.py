"""SamplingParams: how one request is decoded and when it stops.

Order in which the sampler applies the parameters (all in float32, per row of the batch):

1. penalties on the raw logits: repetition (tokens seen in the prompt or the output:
   positive logits divided by the penalty, negative ones multiplied), then frequency and
   presence (output tokens only: ``logit -= frequency * count + presence * (count > 0)``);
2. temperature (0 means greedy: argmax of the penalised logits, steps 3-6 are skipped);
3. top-k, 4. top-p (nucleus, on the distribution left by top-k), 5. min-p (drop tokens whose
   probability is below ``min_p`` times the most likely one's);
6. one draw from what is left.

Reported logprobs are those of the model's raw distribution (log_softmax of the logits before
step 1), which is what GRPO needs and what a full recompute of the sequence gives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import require_for
from .structured_output import check_spec

_check = require_for("SamplingParams")  # messages name the field as the caller writes it


@dataclass
class SamplingParams:
    """Decoding settings of one request; ``validate()`` names the field and the fix on bad values.

    max_tokens: most tokens to generate per sample (None: until the model's length limit).
    temperature: 0 = greedy. top_k: 0 or -1 = off. top_p in (0, 1]. min_p in [0, 1].
    repetition_penalty > 0 (1 = off); presence_penalty / frequency_penalty in [-2, 2].
    seed: same seed and prompt give the same output whatever else is in the batch.
    n: samples per prompt; they share the prompt's KV pages.
    stop: string(s) that end a sample; the stop string and what follows are not returned.
    stop_token_ids: extra token ids that end a sample (the tokenizer's EOS / end-of-turn
    tokens stop it anyway unless ignore_eos). A stop token is kept in token_ids, not in text.
    logprobs: None = off; 0 = logprob of each chosen token; k = plus the k most likely tokens.
    structured_output: constrain the sample to {"json_schema": {...}}, {"json_object": True},
        {"regex": "..."} or {"lark": "..."} (structured_output.py); it stops when complete.
    prompt_logprobs: the same for the prompt's tokens (the first has none: nothing precedes it),
        computed in the prefill the request runs anyway; such a request skips the prefix cache.
    skip_special_tokens: leave special tokens out of the returned text.
    """

    max_tokens: int | None = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    structured_output: dict | None = None
    skip_special_tokens: bool = True
    # Normalised by validate(): stop as a tuple of strings.
    stop_strings: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)

    def validate(self) -> SamplingParams:
        """Check every field; raise ValueError("SamplingParams.<field> ...") on the first bad one."""
        if self.max_tokens is not None:
            _check(
                _is_int(self.max_tokens) and self.max_tokens >= 1,
                "max_tokens",
                f"must be a positive integer (or None for 'up to the length limit'), got {self.max_tokens!r}",
            )
        _check(
            _is_number(self.temperature) and self.temperature >= 0,
            "temperature",
            f"must be a number >= 0 (0 = greedy), got {self.temperature!r}",
        )
        _check(
            _is_int(self.top_k) and (self.top_k >= 0 or self.top_k == -1),
            "top_k",
            f"must be a positive integer, or 0 / -1 to turn it off, got {self.top_k!r}",
        )
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p!r}")
        _check(_is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p!r}")
        _check(
            _is_number(self.repetition_penalty) and self.repetition_penalty > 0,
            "repetition_penalty",
            f"must be > 0 (1 = off), got {self.repetition_penalty!r}",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_number(value) and -2 <= value <= 2, name, f"must be in [-2, 2], got {value!r}")
        _check(self.seed is None or _is_int(self.seed), "seed", f"must be an integer or None, got {self.seed!r}")
        _check(_is_int(self.n) and self.n >= 1, "n", f"must be a positive integer, got {self.n!r}")
        self.stop_strings = _stop_strings(self.stop)
        if self.stop_token_ids is not None:
            ok = isinstance(self.stop_token_ids, (list, tuple)) and all(
                _is_int(t) and t >= 0 for t in self.stop_token_ids
            )
            _check(ok, "stop_token_ids", f"must be a list of non-negative token ids, got {self.stop_token_ids!r}")
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", f"must be true or false, got {self.ignore_eos!r}")
        if self.structured_output is not None:
            check_spec(self.structured_output)
        if self.prompt_logprobs is not None:
            _check(
                _is_int(self.prompt_logprobs) and self.prompt_logprobs >= 0,
                "prompt_logprobs",
                f"must be None (off) or an integer >= 0 (number of alternatives), got {self.prompt_logprobs!r}",
            )
        if self.logprobs is not None:
            _check(
                _is_int(self.logprobs) and self.logprobs >= 0,
                "logprobs",
                f"must be None (off) or an integer >= 0 (number of alternatives), got {self.logprobs!r}",
            )
        _check(
            isinstance(self.skip_special_tokens, bool),
            "skip_special_tokens",
            f"must be true or false, got {self.skip_special_tokens!r}",
        )
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def _stop_strings(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    ok = isinstance(items, (list, tuple)) and all(isinstance(s, str) for s in items)
    _check(ok, "stop", f"must be a string or a list of strings, got {type(stop).__name__} {stop!r}")
    _check(all(items), "stop", "must not contain empty strings (they would match everywhere)")
    return tuple(dict.fromkeys(items))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
