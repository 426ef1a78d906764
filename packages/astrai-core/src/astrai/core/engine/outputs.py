"""What the engine hands back: finished completions and streamed deltas."""

from __future__ import annotations

from dataclasses import dataclass, field

FINISH_REASONS = ("stop", "length", "abort")


class EngineError(RuntimeError):
    """A step of the engine failed; the requests in that step are ended with this error."""


@dataclass
class TokenLogprob:
    """Logprob of one generated token under the model's raw distribution, plus the top alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Sample:
    """One of the ``n`` generated continuations of a prompt.

    finish_reason: "stop" (stop token or stop string), "length" (max_tokens or the model's
    length limit) or "abort". stop_reason: the matched stop string, or the stop token id when
    it came from ``SamplingParams.stop_token_ids``; None for EOS and for other reasons.
    """

    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Completion:
    """All samples of one prompt. The shortcuts (text, token_ids, finish_reason, stop_reason) read samples[0]."""

    request_id: str
    prompt_token_ids: list[int]
    samples: list[Sample]
    prompt: str | None = None
    weights_version: int = 0  # engine.weights_version when the request finished
    error: str | None = None  # set when an engine step failed this request (its samples end "abort")
    prompt_logprobs: list[TokenLogprob | None] | None = None  # SamplingParams.prompt_logprobs; [0] is None

    @property
    def text(self) -> str:
        return self.samples[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.samples[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.samples[0].finish_reason

    @property
    def stop_reason(self) -> str | int | None:
        return self.samples[0].stop_reason

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def completion_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.samples)


@dataclass
class StreamEvent:
    """New output of one sample since its previous event.

    text and token_ids are deltas; joining every event's text gives Sample.text. Text that
    could be the start of a stop string is held back until it is known not to be one.
    finish_reason is None until the sample's last event. completion_tokens counts that
    sample's tokens so far.
    """

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    stop_reason: str | int | None
    prompt_tokens: int
    completion_tokens: int
    weights_version: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on sample 0's first event only
