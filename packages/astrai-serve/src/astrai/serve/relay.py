"""Engine events to the HTTP processes, a whole engine step at a time.

Why: LitServe runs each request as its own asyncio task in the worker. Streaming each token
through it (predict -> encode_response -> LitServe's loop -> the transport) woke one task per
request per engine step and walked several async generators per token, on the thread that
competes with the engine's thread for the GIL: the engine slowed down as the server got busy.

Here the engine hands a whole step's events, of every request of this worker, to one call
(`StepRelay.deliver`, the engine's LoopSink.deliver). Streamed events go straight onto the
reply transport, one reply per request per step, in the message format LitServe's HTTP side
reads; a full (non-streamed) answer is kept until its end. A request's LitServe task only waits
for that end, then returns, and LitServe sends its end-of-stream marker after everything
relayed: both leave through the same transport from the same thread, so order holds.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable

from litserve.utils import LitAPIStatus, LoopResponseType

from astrai.core.engine import END


def event_to_dict(event) -> dict[str, Any]:
    """A StreamEvent as plain data (it crosses a process boundary)."""
    logprobs = None
    if event.logprobs is not None:
        logprobs = [{"id": lp.token_id, "logprob": lp.logprob, "top": [list(t) for t in lp.top]}
                    for lp in event.logprobs]
    return {"index": event.index, "text": event.text, "token_ids": event.token_ids, "logprobs": logprobs,
            "finish_reason": event.finish_reason, "stop_reason": event.stop_reason,
            "prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens}


@dataclass(eq=False)
class RelayedRequest:
    """One request's way back: LitServe's id for it, the HTTP process that waits for it, and
    the future its task awaits (its result: None at a normal end, or the engine's error)."""

    uid: str
    consumer: int
    stream: bool
    done: asyncio.Future
    held: list[dict] = field(default_factory=list)  # a full answer's events, until its end


class StepRelay:
    """The LoopSink.deliver of every request of one worker; see the module docstring."""

    def __init__(self, send: Callable[[Any, int], None], worker_id: int) -> None:
        self.send = send  # the reply transport's send(item, consumer_id)
        self.worker_id = worker_id

    def deliver(self, items: list[tuple[RelayedRequest, Any]]) -> None:
        """One engine step's (request, StreamEvent | END | error) pairs, in the worker's loop."""
        streamed: dict[RelayedRequest, list[dict]] = {}
        ended: list[tuple[RelayedRequest, Any]] = []
        for request, item in items:
            if item is END or isinstance(item, BaseException):
                ended.append((request, None if item is END else item))
            elif request.stream:
                streamed.setdefault(request, []).append(event_to_dict(item))
            else:
                request.held.append(event_to_dict(item))
        for request, events in streamed.items():
            self.send((request.uid, ({"events": events}, LitAPIStatus.OK, LoopResponseType.STREAMING,
                                     self.worker_id)), request.consumer)
        for request, outcome in ended:  # after the sends: a woken task's end marker comes last
            if not request.done.done():
                request.done.set_result(outcome)
