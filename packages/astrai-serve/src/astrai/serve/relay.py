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

litserve_bridge.BurstLoop is the LitServe side of this: it gives the relay the reply
transport LitServe's loop uses, and takes requests off LitServe's queue in bursts.

On the wire a streamed event is a tuple in EVENT_FIELDS order (server.py turns it back into
a dict): cheaper to build and to pickle in the worker, whose every cycle the engine wants.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from astrai.core.engine import END

from .litserve_bridge import reply

EVENT_FIELDS = (
    "index",
    "text",
    "token_ids",
    "logprobs",
    "finish_reason",
    "stop_reason",
    "prompt_tokens",
    "completion_tokens",
    "prompt_logprobs",
    "weights_version",  # the engine's weights when the step that made these tokens ended
)


def logprob_dicts(logprobs) -> list[dict] | None:
    """The engine's TokenLogprobs as the protocol code reads them ({"id", "logprob", "top"})."""
    if logprobs is None:
        return None
    return [{"id": lp.token_id, "logprob": lp.logprob, "top": [list(t) for t in lp.top]} for lp in logprobs]


def prompt_logprob_dicts(logprobs) -> list[dict | None] | None:
    """A request's prompt log-probs (the first is None: nothing precedes it) as logprob_dicts."""
    if logprobs is None:
        return None
    return [None if lp is None else logprob_dicts([lp])[0] for lp in logprobs]


def event_to_tuple(event) -> tuple:
    """A StreamEvent as plain data in EVENT_FIELDS order (it crosses a process boundary)."""
    return (
        event.index,
        event.text,
        event.token_ids,
        logprob_dicts(event.logprobs),
        event.finish_reason,
        event.stop_reason,
        event.prompt_tokens,
        event.completion_tokens,
        prompt_logprob_dicts(event.prompt_logprobs),
        event.weights_version,
    )


def event_to_dict(event) -> dict[str, Any]:
    return dict(zip(EVENT_FIELDS, event_to_tuple(event)))


def as_event_dict(event: tuple | dict) -> dict[str, Any]:
    """An event off the wire (a tuple from the relay, or a dict) as a dict."""
    return event if isinstance(event, dict) else dict(zip(EVENT_FIELDS, event))


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
        streamed: dict[RelayedRequest, list[tuple]] = {}
        ended: list[tuple[RelayedRequest, Any]] = []
        for request, item in items:
            if item is END or isinstance(item, BaseException):
                ended.append((request, None if item is END else item))
            elif request.stream:
                streamed.setdefault(request, []).append(event_to_tuple(item))
            else:
                request.held.append(event_to_dict(item))
        for request, events in streamed.items():
            self.send(reply(request.uid, {"events": events}, self.worker_id), request.consumer)
        for request, outcome in ended:  # after the sends: a woken task's end marker comes last
            if not request.done.done():
                request.done.set_result(outcome)
