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

RelayLoop is the LitServe side of this: it hands the LitAPI the reply transport LitServe's
loop uses, and takes requests off LitServe's queue in bursts (see `_take_all`).

On the wire a streamed event is a tuple in EVENT_FIELDS order (server.py turns it back into
a dict): cheaper to build and to pickle in the worker, whose every cycle the engine wants.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from queue import Empty
from typing import Any, Callable

from litserve.loops import StreamingLoop
from litserve.loops.base import _SENTINEL_VALUE
from litserve.utils import LitAPIStatus, LoopResponseType

from astrai.core.engine import END

EVENT_FIELDS = ("index", "text", "token_ids", "logprobs", "finish_reason", "stop_reason", "prompt_tokens",
                "completion_tokens")


def event_to_tuple(event) -> tuple:
    """A StreamEvent as plain data in EVENT_FIELDS order (it crosses a process boundary)."""
    logprobs = None
    if event.logprobs is not None:
        logprobs = [{"id": lp.token_id, "logprob": lp.logprob, "top": [list(t) for t in lp.top]}
                    for lp in event.logprobs]
    return (event.index, event.text, event.token_ids, logprobs, event.finish_reason, event.stop_reason,
            event.prompt_tokens, event.completion_tokens)


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
            self.send((request.uid, ({"events": events}, LitAPIStatus.OK, LoopResponseType.STREAMING,
                                     self.worker_id)), request.consumer)
        for request, outcome in ended:  # after the sends: a woken task's end marker comes last
            if not request.done.done():
                request.done.set_result(outcome)


class RelayLoop(StreamingLoop):
    """LitServe's async streaming loop with two changes: the LitAPI gets a StepRelay on the
    reply transport this loop uses (so relayed events and LitServe's own messages share its
    sockets, in order), and requests come off the queue in bursts."""

    def __call__(self, lit_api, device, worker_id, request_queue, transport, *args, **kwargs):
        lit_api.relay = StepRelay(transport.send, worker_id)
        return super().__call__(lit_api, device, worker_id, request_queue, transport, *args, **kwargs)

    def run_streaming_loop_async(self, lit_api, request_queue, transport, callback_runner) -> None:
        if lit_api.spec:
            lit_api.spec = lit_api.spec.as_async()  # as LitServe's own loop does

        async def process_requests() -> None:
            loop = asyncio.get_running_loop()
            tasks: set[asyncio.Task] = set()
            while True:
                for request in await loop.run_in_executor(None, _take_all, request_queue):
                    if request == _SENTINEL_VALUE:
                        return
                    response_queue_id, uid = request[0], request[1]
                    self.put_response(transport, response_queue_id, uid, (), LitAPIStatus.START,
                                      LoopResponseType.STREAMING)
                    task = asyncio.create_task(self._process_streaming_request(request, lit_api, transport,
                                                                               callback_runner))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)

        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(process_requests())
        except KeyboardInterrupt:
            self.kill()


def _take_all(request_queue) -> list:
    """Wait up to a second for a request, then take every request already queued.

    LitServe's loop takes one request per trip to a thread, and a burst of clients then
    reaches the engine one request at a time, each starting its own prefill step. Taken
    together, they start in the same engine step(s), as they would with the engine alone.
    """
    try:
        requests = [request_queue.get(timeout=1.0)]
    except (Empty, ValueError, OSError, EOFError):  # nothing yet, or the queue is closing
        return []
    while True:
        try:
            requests.append(request_queue.get_nowait())
        except (Empty, ValueError, OSError, EOFError):
            return requests
