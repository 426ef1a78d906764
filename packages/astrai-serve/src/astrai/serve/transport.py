"""The channel that carries worker replies to the HTTP process: ZeroMQ PUSH/PULL, batched.

Why not LitServe's own: in LitServe 0.2.19 `fast_queue=True` is silently ignored (it passes
`transport_config=` where TransportConfig expects `transport_type=`, LitServe issue #751), so
every reply went through a multiprocessing Manager queue: one blocking round trip to the
manager process per streamed token in the worker, one thread hop per token in the HTTP
process. Its ZMQ transport, once enabled, also has the broker's addresses swapped, and PUB/SUB
drops messages when a reader falls behind, which would lose tokens or a stream's end.

Here each HTTP process (consumer) binds one PULL socket; workers PUSH to it. PUSH never drops.
A worker running an asyncio loop does not send each reply at once: replies produced in one
loop pass (after an engine step, one per streaming request) are pickled and sent together on
the next pass, so messages scale with engine steps, not with tokens. The HTTP side unpacks
the batch and hands LitServe the replies one by one, in order.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import threading
from collections import deque
from typing import Any

import zmq
import zmq.asyncio

from .ipc import ipc_addresses, open_socket, remove_socket_files
from .litserve_bridge import MessageTransport


class BatchedZMQTransport(MessageTransport):
    """LitServe MessageTransport over ZeroMQ PUSH/PULL; see the module docstring.

    Made in the main process (addresses only); sockets are opened lazily in the process and
    thread that uses them, so the object can be pickled to spawned workers and inherited by
    the forked HTTP process.
    """

    def __init__(self, num_consumers: int, directory: str | None = None) -> None:
        if num_consumers < 1:
            raise ValueError(f"num_consumers must be at least 1, got {num_consumers}")
        self.addresses = ipc_addresses("reply", num_consumers, directory)
        self._reset()
        self._owner_pid = os.getpid()

    def _reset(self) -> None:
        self._local = threading.local()  # per thread: {consumer_id: PUSH socket}, pending batches
        self._pull: zmq.asyncio.Socket | None = None
        self._received: deque = deque()
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {"addresses": self.addresses}

    def __setstate__(self, state: dict) -> None:
        self.addresses = state["addresses"]
        self._reset()
        self._owner_pid = None

    # -- worker side ----------------------------------------------------------------------
    def send(self, item: Any, consumer_id: int) -> None:
        local = self._thread_state()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a synchronous LitServe loop: nothing to batch with
            self._push(local, consumer_id, [item])
            return
        batch = local.pending.get(consumer_id)
        if batch is None:
            batch = local.pending[consumer_id] = []
            # Runs after every task woken in this loop pass has put its reply.
            loop.call_soon(self._flush, local, consumer_id)
        batch.append(item)

    def _flush(self, local, consumer_id: int) -> None:
        batch = local.pending.pop(consumer_id, None)
        if batch:
            self._push(local, consumer_id, batch)

    def _push(self, local, consumer_id: int, items: list) -> None:
        sock = local.sockets.get(consumer_id)
        if sock is None:
            # linger: a closing worker still delivers what it sent
            sock = open_socket(local.context, zmq.PUSH, self.addresses[consumer_id], bind=False, linger_ms=1000)
            local.sockets[consumer_id] = sock
        sock.send(pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL))

    def _thread_state(self):
        if self._pid != os.getpid():  # forked after use: sockets do not survive a fork
            self._reset()
        local = self._local
        if not hasattr(local, "sockets"):
            local.context = zmq.Context()
            local.sockets, local.pending = {}, {}
        return local

    # -- HTTP side ------------------------------------------------------------------------
    async def areceive(self, consumer_id: int = 0, timeout: float | None = None) -> Any:
        if self._received:
            return self._received.popleft()
        if self._pull is None or self._pid != os.getpid():
            self._reset()
            self._pull = open_socket(zmq.asyncio.Context(), zmq.PULL, self.addresses[consumer_id], bind=True)
        if timeout is None:
            data = await self._pull.recv()
        else:
            data = await asyncio.wait_for(self._pull.recv(), timeout)
        items = pickle.loads(data)
        self._received.extend(items[1:])
        return items[0]

    def close(self, **kwargs: Any) -> None:
        """Close this process's sockets (replies still queued get a moment to leave); the process
        that made the transport (LitServe's main process, at shutdown) or bound a socket also
        removes the ipc files."""
        owner = self._owner_pid == os.getpid() or self._pull is not None
        if self._pull is not None:
            self._pull.close(linger=0)
            self._pull = None
        for sock in (getattr(self._local, "sockets", None) or {}).values():
            sock.close(linger=1000)
        if owner:
            remove_socket_files(self.addresses)
