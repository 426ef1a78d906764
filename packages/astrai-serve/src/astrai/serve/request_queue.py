"""The channel that carries requests from the HTTP processes to the engine workers: ZeroMQ,
one PULL socket per worker, and the HTTP process picks the worker.

Why not LitServe's request queue: it is a multiprocessing Manager queue, so every put (in an
HTTP process) and every get (in a worker) is a round trip to the one manager process, and
the gets of a burst run one after another in the worker, each waiting for the GIL that the
engine's thread holds while it launches a step. On one H100 a burst of 256 requests waited
about 45 ms on that queue (512: about 150 ms), more than the engine's whole prefill of the
first ones; with more HTTP processes the single manager made it worse. Here a put is a
non-blocking send, and a worker takes every waiting request in one pass of its event loop.

Routing also makes a dead worker's requests known: the HTTP side records which worker each
request went to, so when that worker dies exactly its requests end with a 503, and nothing
sent to it waits in a shared queue for a worker that may never come. Each message names the
worker process it was meant for (its pid): a worker started in a dead one's place drops what
was sent to its predecessor, which the HTTP side has already answered with an error.

Made in the main process (addresses only); sockets open lazily in the process that uses them,
so the object pickles to spawned workers and survives the fork of the HTTP processes.
"""

from __future__ import annotations

import logging
import os
import pickle
from typing import Any

import zmq
import zmq.asyncio

from .ipc import ipc_addresses, open_socket, remove_socket_files

log = logging.getLogger("astrai.serve")


class RoutedRequestQueue:
    """Requests to the engine workers, each sent to the one worker the HTTP side chose."""

    def __init__(self, num_workers: int, directory: str | None = None) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {num_workers}")
        self.addresses = ipc_addresses("req", num_workers, directory)
        self._reset()
        self._owner_pid = os.getpid()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._push: dict[int, zmq.Socket] = {}  # HTTP side: worker -> PUSH socket (event-loop thread only)
        self._pull: zmq.asyncio.Socket | None = None  # worker side
        self._worker: int | None = None

    def __getstate__(self) -> dict:
        return {"addresses": self.addresses}

    def __setstate__(self, state: dict) -> None:
        self.addresses = state["addresses"]
        self._reset()
        self._owner_pid = None

    @property
    def num_workers(self) -> int:
        return len(self.addresses)

    # -- HTTP side ----------------------------------------------------------------------
    def put(self, item: Any, worker: int = 0, worker_pid: int = 0) -> None:
        """Send `item` (LitServe's request tuple) to `worker`, whose current process is
        `worker_pid` (0: whichever process serves that slot). Never blocks: ZeroMQ queues it
        until the worker reads it, or connects."""
        if self._pid != os.getpid():  # forked after use: sockets do not survive a fork
            self._reset()
        sock = self._push.get(worker)
        if sock is None:
            # no linger: at exit, requests nobody will answer may go
            sock = open_socket(zmq.Context.instance(), zmq.PUSH, self.addresses[worker], bind=False)
            self._push[worker] = sock
        sock.send(pickle.dumps((worker_pid, item), protocol=pickle.HIGHEST_PROTOCOL))

    # -- worker side --------------------------------------------------------------------
    def bind(self, worker: int) -> None:
        """Start receiving as `worker` (in the worker process, before its first take_all)."""
        if self._pid != os.getpid():
            self._reset()
        self._worker = worker
        self._pull = open_socket(zmq.asyncio.Context.instance(), zmq.PULL, self.addresses[worker], bind=True)

    async def take_all(self, timeout: float) -> list:
        """Every request waiting for this worker, after waiting up to `timeout` seconds for
        the first; requests meant for another process of this slot are dropped."""
        if self._pull is None:
            raise RuntimeError("RoutedRequestQueue.take_all before bind(worker)")
        if not await self._pull.poll(timeout * 1000):
            return []
        me, taken, stale = os.getpid(), [], 0
        while True:
            try:
                data = await self._pull.recv(zmq.NOBLOCK)  # done at once: data, or Again when none is left
            except zmq.Again:
                break
            target, item = pickle.loads(data)
            if target and target != me:
                stale += 1
                continue
            taken.append(item)
        if stale:
            log.info("worker %s: dropped %d request(s) sent to its dead predecessor", self._worker, stale)
        return taken

    def close(self) -> None:
        """Close this process's sockets; the process that made the queue also removes the files."""
        if self._pull is not None:
            self._pull.close(linger=0)
            self._pull = None
        for sock in self._push.values():
            sock.close(linger=0)
        self._push.clear()
        if self._owner_pid == os.getpid():
            remove_socket_files(self.addresses)
