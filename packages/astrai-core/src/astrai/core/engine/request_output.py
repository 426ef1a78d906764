"""The requests-out side of a step: stream events, finished samples and completions.

EngineCore (one step's work) hands each sampled token to its sequence; what that ends or
streams is collected here: events wait in an outbox until the step is over and `flush` delivers
them (one wake-up per asyncio loop per step), and ended requests wait for the engine to take
them. END and LoopSink, what a request's sink receives and where an asyncio consumer's events
go, live here too (engine_core and the astrai.core.engine package export them as before).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

from .outputs import Completion, EngineError, Sample, StreamEvent
from .scheduler import Scheduler
from .sequence import Request, Sequence

END = object()  # the last item a request's sink receives


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in items:
        q.put_nowait(item)


@dataclasses.dataclass(frozen=True)
class LoopSink:
    """Where an asyncio consumer's events go: `deliver` runs inside `loop` once per engine step
    with the (target, item) pairs of every request that shares that loop and deliver function.

    The default fills each request's asyncio queue (`target`). A server passes its own deliver
    to handle a whole step's events in one call instead of waking one task per request.
    """

    loop: asyncio.AbstractEventLoop
    target: object
    deliver: Callable[[list[tuple[object, object]]], None] = _put_all


class RequestOutput:
    """Ends and streams a step's sequences and requests; EngineCore owns one (core.output).

    weights_version is the version every event and completion carries (EngineCore.load_weights
    sets it)."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.weights_version = 0
        self.ended: list[Request] = []  # requests that finished or failed since the last step()
        self.outbox: list[tuple[object, object]] = []  # (sink, item) to deliver after the step

    def take_ended(self) -> list[Request]:
        ended, self.ended = self.ended, []
        return ended

    def emit(self, seq: Sequence, finish_reason, stop_reason) -> None:
        r = seq.request
        final = finish_reason is not None
        if r.sink is None:
            if final:
                seq.text.delta(final=True)  # flush the decoder into seq.text.text
            return
        text = seq.text.delta(final=final)
        n_prompt = len(r.prompt_token_ids)
        prompt_logprobs = r.prompt_logprobs if seq.index == 0 and seq.num_streamed == 0 else None
        new = seq.token_ids[n_prompt + seq.num_streamed :]
        logprobs = seq.logprobs[seq.num_streamed :] if seq.logprobs is not None else None
        seq.num_streamed = len(seq.token_ids) - n_prompt
        self._send(
            r,
            StreamEvent(
                r.request_id,
                seq.index,
                text,
                new,
                logprobs,
                finish_reason,
                stop_reason,
                n_prompt,
                seq.num_streamed,
                self.weights_version,
                prompt_logprobs,
            ),
        )

    def finish(self, seq: Sequence, reason: str, stop_reason) -> None:
        """End seq (and, before its first token, the samples it would have forked)."""
        r = seq.request
        self.scheduler.remove(seq)
        r.seqs.remove(seq)
        self.emit(seq, reason, stop_reason)
        r.samples[seq.index] = Sample(seq.index, seq.output_ids, seq.text.text, reason, stop_reason, seq.logprobs)
        for k in range(1, seq.num_samples):
            idx = seq.index + k
            r.samples[idx] = Sample(idx, [], "", reason, stop_reason, logprob_list(r))
            if r.sink is not None:
                self._send(
                    r,
                    StreamEvent(
                        r.request_id,
                        idx,
                        "",
                        [],
                        r.samples[idx].logprobs,
                        reason,
                        stop_reason,
                        len(r.prompt_token_ids),
                        0,
                        self.weights_version,
                    ),
                )
        if r.finished:
            r.completion = self._completion(r)
            self._end(r, END)

    def fail(self, requests: list[Request], error: Exception) -> None:
        """End requests with an EngineError; their samples keep what they had and end with "abort"."""
        for r in dict.fromkeys(requests):
            if r.completion is not None:
                continue
            for seq in list(r.seqs):
                self.scheduler.remove(seq)
                r.samples[seq.index] = Sample(seq.index, seq.output_ids, seq.text.text, "abort", None, seq.logprobs)
            r.seqs.clear()
            for i, sample in enumerate(r.samples):
                if sample is None:
                    r.samples[i] = Sample(i, [], "", "abort")
            r.error = EngineError(f"request {r.request_id!r} failed in an engine step: {error!r}")
            r.error.__cause__ = error
            r.completion = self._completion(r, error=str(r.error))
            self._end(r, r.error)

    def _completion(self, r: Request, error: str | None = None) -> Completion:
        return Completion(
            r.request_id,
            r.prompt_token_ids,
            list(r.samples),
            r.prompt,
            self.weights_version,
            error=error,
            prompt_logprobs=r.prompt_logprobs,
        )

    def _end(self, r: Request, last_item) -> None:
        self.ended.append(r)
        if r.sink is not None:
            self._send(r, last_item)

    def _send(self, r: Request, item) -> None:
        self.outbox.append((r.sink, item))

    def flush(self) -> None:
        """Deliver what the step produced: one wake-up per asyncio loop per step, not one per event."""
        outbox, self.outbox = self.outbox, []
        by_loop: dict = {}
        for sink, item in outbox:
            if isinstance(sink, LoopSink):
                by_loop.setdefault((sink.loop, sink.deliver), []).append((sink.target, item))
            else:
                sink(item)
        for (loop, deliver), items in by_loop.items():
            try:
                loop.call_soon_threadsafe(deliver, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass


def logprob_list(r: Request):
    return [] if r.params.logprobs is not None else None
