"""Everything astrai-serve takes from LitServe beyond its public API, in one place.

LitServe runs the processes (API servers, inference workers, the request queue's manager) and
we keep it for that; but serving at engine speed and surviving dead workers needed hooks its
public API does not offer: our own reply transport, requests taken off its queue in bursts, a
worker's replies sent from outside `predict`, reply buffers we end ourselves, the start-up
status of its workers. Each use of a private name is here, the version these were read from
is pinned in pyproject.toml (LITSERVE_VERSION), and tests/serve/test_litserve_bridge.py fails
loudly when a name or a message layout we rely on changes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from litserve import LitAPI, LitServer
from litserve.loops import StreamingLoop
from litserve.loops.base import _SENTINEL_VALUE
from litserve.specs.base import LitSpec
from litserve.transport.base import MessageTransport
from litserve.utils import LitAPIStatus, LoopResponseType, ResponseBufferItem, WorkerSetupStatus

LITSERVE_VERSION = "0.2.19"  # the version this module was written against (and pinned)

__all__ = [
    "LITSERVE_VERSION",
    "LitAPI",
    "LitAPIStatus",
    "LitServer",
    "LitSpec",
    "MessageTransport",
    "BurstLoop",
    "ReplyTransportServer",
    "new_reply_buffer",
    "queue_request",
    "reply",
    "serve_at_root",
    "startup_state",
]


# -- messages -----------------------------------------------------------------------------
def reply(uid: str, data: Any, worker_id: int, status: LitAPIStatus = LitAPIStatus.OK) -> tuple:
    """A worker's streamed reply as LitServe's HTTP side reads it off the transport
    (`response_queue_to_buffer`: uid, (*response, response_type, worker_id))."""
    return uid, (data, status, LoopResponseType.STREAMING, worker_id)


def queue_request(spec: LitSpec, uid: str, payload: Any, worker: int, worker_pid: int) -> None:
    """Send a request to `worker` (process `worker_pid`) in LitServe's request layout; its
    replies will come to this API-server process (spec.response_queue_id). The queue is
    ReplyTransportServer's RoutedRequestQueue."""
    spec.request_queue.put((spec.response_queue_id, uid, time.monotonic(), payload), worker, worker_pid)


def new_reply_buffer(spec: LitSpec, uid: str, queue, event: asyncio.Event) -> ResponseBufferItem:
    """Register where the HTTP side collects uid's replies: LitServe appends (data, status) to
    `queue` and sets `event`; `.worker_id` tells which worker took the request (None before)."""
    item = ResponseBufferItem(event=event, response_queue=queue)
    spec.response_buffer[uid] = item
    return item


def startup_state(server: LitServer) -> tuple[Any, list]:
    """(worker setup statuses, worker processes) of a running LitServer; (None, []) before
    they exist. Statuses map a worker key to WorkerSetupStatus (writable)."""
    return getattr(server, "workers_setup_status", None), list(getattr(server, "inference_workers", None) or [])


READY, FAILED = WorkerSetupStatus.READY, WorkerSetupStatus.ERROR


def serve_at_root(server: LitServer, endpoint: Callable) -> None:
    """Answer GET / with `endpoint` instead of LitServe's own index ("litserve running"), which
    LitServe registers before any spec route and so would shadow ours."""
    server.app.router.routes = [r for r in server.app.router.routes if getattr(r, "path", None) != "/"]
    server.app.add_api_route("/", endpoint, methods=["GET"], include_in_schema=False)


# -- the server ---------------------------------------------------------------------------
class ReplyTransportServer(LitServer):
    """LitServer whose requests travel over the queue `make_request_queue(num_workers)` returns
    (request_queue.py says why not LitServe's), and whose worker replies travel over the
    transport `make_transport(num_api_servers)` returns (when set): LitServe 0.2.19 ignores
    `fast_queue=True` (its issue #751), so its own choice is a multiprocessing Manager queue,
    one round trip per reply."""

    make_transport: Callable[[int], MessageTransport] | None = None
    make_request_queue: Callable[[int], Any] | None = None

    def _init_manager(self, num_api_servers: int):
        manager = super()._init_manager(num_api_servers)
        if self.make_transport is not None:
            self._transport = self.make_transport(num_api_servers)
        if self.make_request_queue is not None:
            for path in self.litapi_request_queues:
                workers = len(self._inference_workers_config_for_api(path))
                self.litapi_request_queues[path] = self.make_request_queue(workers)
        return manager

    def request_queues(self) -> list:
        return list(self.litapi_request_queues.values())


class BurstLoop(StreamingLoop):
    """LitServe's async streaming loop with two changes: `on_start(lit_api, send, worker_id)`
    runs first in the worker, with the `send(item, consumer_id)` of the reply transport this
    loop uses (so replies sent from outside predict share its sockets, in order, with LitServe's
    own messages); and requests come from a RoutedRequestQueue, every waiting one at once, in
    the loop itself: a burst of clients reaches the engine together, as it would with the
    engine alone, and no thread hop or manager round trip stands between."""

    def __init__(self, on_start: Callable[[LitAPI, Callable, int], None]) -> None:
        super().__init__()
        self.on_start = on_start

    def __call__(self, lit_api, device, worker_id, request_queue, transport, *args, **kwargs):
        self.queue_slot = worker_id  # (LitLoop.worker_id is a read-only property from the environment)
        self.on_start(lit_api, transport.send, worker_id)
        return super().__call__(lit_api, device, worker_id, request_queue, transport, *args, **kwargs)

    def run_streaming_loop_async(self, lit_api, request_queue, transport, callback_runner) -> None:
        if lit_api.spec:
            lit_api.spec = lit_api.spec.as_async()  # as LitServe's own loop does

        async def process_requests() -> None:
            request_queue.bind(self.queue_slot)  # in the loop that will read it
            tasks: set[asyncio.Task] = set()
            while True:
                for request in await request_queue.take_all(timeout=1.0):
                    if request == _SENTINEL_VALUE:
                        return
                    response_queue_id, uid = request[0], request[1]
                    self.put_response(
                        transport, response_queue_id, uid, (), LitAPIStatus.START, LoopResponseType.STREAMING
                    )
                    task = asyncio.create_task(
                        self._process_streaming_request(request, lit_api, transport, callback_runner)
                    )
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)

        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(process_requests())
        except KeyboardInterrupt:
            self.kill()
