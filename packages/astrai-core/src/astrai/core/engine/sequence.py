"""Requests and their sequences: the state the scheduler and the engine share.

A request has n samples. It enters as one sequence that carries all n: the prompt is
computed once, and the first sampling step draws n tokens from its last logits and forks
n - 1 more sequences that share the prompt's pages. From then on each sample is its own
sequence, scheduled, preempted and finished on its own.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from enum import Enum

from .outputs import Completion, Sample, TokenLogprob
from .params import SamplingParams
from .stop import SampleText


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int  # admission order: first come, first served; the newest is preempted first
    max_tokens: int  # params.max_tokens capped by the room left under max_model_len
    sample_seeds: list[int | None]  # one per sample (sampler.seeded_uniform's key), None when unseeded
    eos_ids: frozenset[int]
    sink: object = None  # where StreamEvents go (a callable or an asyncio loop's queue), then the end marker
    samples: list[Sample | None] = field(default_factory=list)  # filled in as samples finish
    seqs: list[Sequence] = field(default_factory=list)  # live sequences
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    completion: Completion | None = None  # set when the request ends (finished, aborted or failed)
    # With params.prompt_logprobs: one entry per prompt token, filled in as its prefill runs.
    prompt_logprobs: list[TokenLogprob | None] | None = None

    def __post_init__(self) -> None:
        self.samples = [None] * self.params.n
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]  # the first token has nothing before it

    @property
    def finished(self) -> bool:
        return all(s is not None for s in self.samples)


@dataclass(eq=False)
class Sequence:
    request: Request
    index: int  # sample index within the request
    token_ids: list[int]  # prompt, then generated tokens
    text: SampleText
    num_samples: int = 1  # > 1 until the first token: how many samples this sequence forks into
    status: Status = Status.WAITING
    num_computed: int = 0  # leading tokens whose keys/values are in the cache
    pages: list[int] = field(default_factory=list)
    page_hashes: list[int] = field(default_factory=list)  # chained hashes of full pages of token_ids
    num_registered: int = 0  # leading pages already offered to the prefix cache
    epoch: int = 0  # scheduler epoch (weights) its cached keys/values were computed under
    logprobs: list[TokenLogprob] | None = None
    num_streamed: int = 0  # output tokens already sent to a stream
    # Tokens sampled on the device that the host has not read yet (0, 1, or a multi-step group's
    # K): they come after token_ids. While the device runs the next decode step (or group), the
    # host reads these (engine_core.py).
    num_inflight: int = 0
    matcher: object = None  # with params.structured_output: its grammar's state (structured_output.py)

    @property
    def order(self) -> tuple[int, int]:
        return self.request.arrival, self.index

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_pending(self) -> int:
        """Tokens still to be run through the model before the next one can be sampled."""
        return len(self.token_ids) + self.num_inflight - self.num_computed

    @property
    def out_of_tokens(self) -> bool:
        """Its last allowed token is already sampled (in flight): nothing more to compute."""
        return len(self.token_ids) + self.num_inflight - self.num_prompt_tokens >= self.request.max_tokens
