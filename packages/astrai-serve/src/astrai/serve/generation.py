"""What every protocol turns a request into, and how engine events fold back into answers.

The HTTP process validates and tokenizes; the inference worker only sees a `Generation`
payload (prompt ids + SamplingParams fields), so every 4xx is decided before the engine
is involved. The worker sends back lists of events (relay.py: tuples in EVENT_FIELDS order, read
back as dicts in server.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from astrai.core.engine import SamplingParams

from .errors import APIError, bad_request


@dataclass
class ModelInfo:
    """What the HTTP process knows about the served model."""

    name: str
    tokenizer: Any  # astrai.core.tokenizer.AutoTokenizer
    max_model_len: int
    max_batch_size: int = 64
    created: int = 0


@dataclass
class Generation:
    prompt_ids: list[int]
    params: dict[str, Any]  # SamplingParams keyword arguments
    stream: bool = False

    def payload(self, request_id: str) -> dict[str, Any]:
        return {
            "op": "generate",
            "request_id": request_id,
            "prompt_ids": self.prompt_ids,
            "params": self.params,
            "stream": self.stream,
        }


def encode(tokenizer, text: str, add_special_tokens: bool = False) -> list[int]:
    """Token ids of a prompt, through `encode_batch`: the Rust tokenizer lets go of Python's GIL
    there (its single `encode` holds it), so a multi-megabyte prompt tokenizing in a worker
    thread does not stall the event loop that answers every other request meanwhile."""
    return tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0]


def fit_max_tokens(prompt_len: int, requested: int | None, info: ModelInfo, param: str, prompt_param: str) -> int:
    """The number of tokens to generate, or a 400 when prompt + completion exceed the context."""
    limit = info.max_model_len
    if prompt_len == 0:
        raise bad_request(f"'{prompt_param}' is empty after tokenization; send at least one token", prompt_param)
    if prompt_len >= limit:
        raise bad_request(
            f"this model's maximum context length is {limit} tokens, but the prompt has {prompt_len} tokens; "
            f"shorten '{prompt_param}'",
            prompt_param,
        )
    if requested is None:
        return limit - prompt_len
    if prompt_len + requested > limit:
        raise bad_request(
            f"this model's maximum context length is {limit} tokens, but {prompt_len + requested} were requested "
            f"({prompt_len} in the prompt, {requested} in '{param}'); set '{param}' to at most {limit - prompt_len} "
            "or shorten the prompt",
            param,
        )
    return requested


def checked_params(params: dict[str, Any]) -> dict[str, Any]:
    """Run the engine's own validation so nothing the protocol layer missed reaches the worker."""
    try:
        SamplingParams(**params).validate()
    except ValueError as e:
        name = str(e).split()[0].removeprefix("SamplingParams.")
        raise bad_request(str(e).removeprefix("SamplingParams."), name) from None
    return params


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    bad = [i for i in ids if i >= vocab_size]
    if bad:
        raise bad_request(f"'{param}' holds token id {bad[0]}, but the vocabulary has {vocab_size} tokens", param)


@dataclass
class Choice:
    """One sample of a finished request, folded from its events."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    version_spans: list[list[int]] = field(default_factory=list)  # [[weights version, tokens], ...] in order


def version_spans(event: dict[str, Any]) -> list[list[int]]:
    """Which weights made an event's tokens: [[version, count], ...]; an event off the wire
    has one version (one engine step), a merged one keeps the spans of its parts."""
    spans = event.get("version_spans")
    if spans is not None:
        return spans
    return [[event.get("weights_version", 0), len(event["token_ids"])]] if event["token_ids"] else []


def join_spans(spans: list[list[int]], more: list[list[int]]) -> list[list[int]]:
    """spans + more, with neighbouring spans of one version made one."""
    out = [list(s) for s in spans]
    for version, count in more:
        if out and out[-1][0] == version:
            out[-1][1] += count
        else:
            out.append([version, count])
    return out


class Accumulator:
    """Fold worker events (possibly from several samples, interleaved) into choices and usage."""

    def __init__(self, n: int) -> None:
        self.choices = [Choice(i) for i in range(n)]
        self.prompt_tokens = 0
        self.prompt_logprobs: list[dict | None] | None = None  # with SamplingParams.prompt_logprobs
        self.weights_version = 0  # the newest weights that made any of the answer (every response says it)

    def add(self, event: dict[str, Any]) -> Choice:
        choice = self.choices[event["index"]]
        choice.text += event["text"]
        choice.token_ids += event["token_ids"]
        choice.logprobs += event["logprobs"] or []
        choice.version_spans = join_spans(choice.version_spans, version_spans(event))
        self.weights_version = max(self.weights_version, event.get("weights_version", 0))
        if event["finish_reason"] is not None:
            choice.finish_reason = event["finish_reason"]
            choice.stop_reason = event["stop_reason"]
        self.prompt_tokens = max(self.prompt_tokens, event["prompt_tokens"])
        if event.get("prompt_logprobs") is not None:
            self.prompt_logprobs = event["prompt_logprobs"]
        return choice

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)

    @property
    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def merge_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Join the deltas of each sample into one event, samples in order of first appearance.

    Whatever piled up while the HTTP side was busy goes out as one chunk per sample, so the
    number of chunks adapts to load instead of the cost per token growing with it.
    """
    merged: dict[int, dict[str, Any]] = {}
    for event in events:
        into = merged.get(event["index"])
        if into is None:
            merged[event["index"]] = {
                **event,
                "token_ids": list(event["token_ids"]),
                "logprobs": None if event["logprobs"] is None else list(event["logprobs"]),
            }
            continue
        into["version_spans"] = join_spans(version_spans(into), version_spans(event))
        into["text"] += event["text"]
        into["token_ids"] += event["token_ids"]
        if event["logprobs"] is not None:
            into["logprobs"] = (into["logprobs"] or []) + event["logprobs"]
        for key in ("finish_reason", "stop_reason", "prompt_tokens", "completion_tokens"):
            into[key] = event[key]
        into["weights_version"] = max(into.get("weights_version", 0), event.get("weights_version", 0))
        if event.get("prompt_logprobs") is not None:
            into["prompt_logprobs"] = event["prompt_logprobs"]
    return list(merged.values())


def worker_error(message: dict[str, Any]) -> APIError:
    """An error the worker reported as {"error": {"status", "message", "param"}}."""
    err = message["error"]
    return APIError(err.get("status", 500), err["message"], param=err.get("param"))
