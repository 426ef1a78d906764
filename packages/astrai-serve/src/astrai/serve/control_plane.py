"""A side channel from the HTTP process to every engine worker: aborts, statistics and the
admin commands (admin.py: pause, update_weights, resume).

Requests travel to one worker each (request_queue.py), read by the worker's request loop
only between its bursts; an abort must reach the engine that holds the request at once, and
/stats must hear from every engine, busy or not. So each worker answers an inbox of its own
(indexed by LitServe's worker id) on a thread of its own, and the answers come back to the
API-server process (consumer) that asked. Aborts go to every inbox: only the engine holding
the request acts on them, the others just remember the id (in case the request has not
reached them yet, it never will).

Both directions are ZeroMQ PUSH/PULL over ipc sockets, not multiprocessing queues: a worker
killed with SIGKILL in the middle of a queue's read or write left its lock taken, or half a
message in the pipe, and the worker started in its place, or every later /stats, waited for
ever. A ZeroMQ message arrives whole or not at all; a dead worker's unread messages go to its
successor, which answers a stale stats request with a token nobody waits for any more.

Made in the main process (addresses and the liveness arrays only) before LitServe starts its
processes; sockets open lazily in the process and thread that uses them.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import zmq

from .ipc import ipc_addresses, open_socket, remove_socket_files
from .liveness import WorkerLiveness

log = logging.getLogger("astrai.serve")

_READ_SLICE_S = 0.02  # how long a call reads answers before an overlapping call may

# Engine statistics that are the same for every engine, or that do not add up: the combined
# /stats shows the smallest (max_model_len: what every engine can serve) or the mean.
_SMALLEST = ("page_size", "max_model_len", "weights_version", "weight_updates")
_MEAN = ("prefix_cache_hit_rate",)


class ControlPlane:
    def __init__(self, num_workers: int, num_consumers: int = 1, directory: str | None = None) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {num_workers}")
        if num_consumers < 1:
            raise ValueError(f"num_consumers must be at least 1, got {num_consumers}")
        self.inbox_addresses = ipc_addresses("ctl-in", num_workers, directory)
        # One reply address per API-server process (consumer): each reads only its own answers.
        self.reply_addresses = ipc_addresses("ctl-out", num_consumers, directory)
        self.liveness = WorkerLiveness(num_workers)  # which workers' engines serve (liveness.py)
        self._owner_pid = os.getpid()
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()  # one reader of the reply socket at a time
        self._waiting: dict[str, dict[int, dict]] = {}  # token of a call in progress -> answers read for it
        self._send_lock = threading.Lock()  # the inbox sockets, shared by the threads that send
        self._inboxes: dict[int, zmq.Socket] = {}
        self._replies: dict[int, zmq.Socket] = {}  # consumer -> this process's PULL socket

    @property
    def num_workers(self) -> int:
        return len(self.inbox_addresses)

    @property
    def num_consumers(self) -> int:
        return len(self.reply_addresses)

    def __getstate__(self) -> dict:
        return {
            "inbox_addresses": self.inbox_addresses,
            "reply_addresses": self.reply_addresses,
            "liveness": self.liveness,
        }

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._owner_pid = None
        self._reset()

    def _check_process(self) -> None:
        if self._pid != os.getpid():  # forked after use: sockets do not survive a fork
            self._reset()

    # -- HTTP side ----------------------------------------------------------------------
    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def _send(self, message: tuple[str, Any]) -> None:
        self._check_process()
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        with self._send_lock:
            for worker, address in enumerate(self.inbox_addresses):
                sock = self._inboxes.get(worker)
                if sock is None:
                    sock = self._inboxes[worker] = _socket(zmq.PUSH, address, bind=False)
                sock.send(data)

    def stats(self, timeout: float = 10.0, consumer: int = 0) -> list[dict[str, Any]]:
        """One entry per worker, in worker order: {"worker", "device", "stats", ...}, or
        {"worker", "error"} for a worker that did not answer within `timeout` seconds.

        Blocking: call it from a thread of API-server process `consumer`, where the answers
        come back. Calls may overlap (a /stats during a long pause): whichever call reads an
        answer hands it to the call it belongs to; answers to a call that timed out are dropped.
        """
        return self.ask("stats", None, timeout, consumer)

    def ask(self, op: str, arg: Any, timeout: float = 10.0, consumer: int = 0) -> list[dict[str, Any]]:
        """Send `op` (stats, or a command the workers registered in `serve`, e.g. the admin
        pause / update_weights / resume) to every worker and wait for each one's answer, as
        `stats` does; a worker that did not answer within `timeout` gets {"worker", "error"}."""
        self._check_process()
        token = uuid.uuid4().hex
        with self._lock:
            if consumer not in self._replies:
                self._replies[consumer] = _socket(zmq.PULL, self.reply_addresses[consumer], bind=True)
            answers = self._waiting[token] = {}
        try:
            self._send((op, (token, consumer, arg)))
            deadline = time.monotonic() + timeout
            while len(answers) < self.num_workers and (left := deadline - time.monotonic()) > 0:
                with self._lock:  # read for a short while, then let an overlapping call read
                    self._read_answers(self._replies[consumer], min(left, _READ_SLICE_S))
        finally:
            with self._lock:
                del self._waiting[token]
        return [
            answers.get(i) or {"worker": i, "error": f"no answer within {timeout:g} s"} for i in range(self.num_workers)
        ]

    def _read_answers(self, replies: zmq.Socket, seconds: float) -> None:
        """File the answers that arrive within `seconds` under the calls waiting for them."""
        while replies.poll(seconds * 1000):
            answer = pickle.loads(replies.recv())
            waiting = self._waiting.get(answer.pop("token", None))
            if waiting is not None:
                waiting[answer["worker"]] = answer
            seconds = 0  # then only what is already there

    # -- worker side --------------------------------------------------------------------
    def serve(
        self,
        worker_id: int,
        on_abort: Callable[[str], None],
        describe: Callable[[], dict[str, Any]],
        commands: dict[str, Callable[[Any], dict[str, Any]]] | None = None,
    ) -> threading.Thread:
        """Answer this worker's inbox on a daemon thread: aborts call `on_abort(request_id)`,
        stats requests are answered with `describe()` (a dict with "stats" and more), and a
        command `op` sent with `ask` by `commands[op](arg)` (a dict; an exception becomes
        {"error"}). Commands run one at a time, in the order they were sent, on a second
        thread: a command that takes long (a pause that lets requests finish) must not hold
        up the aborts, which may be what it waits for, or /stats."""
        if not 0 <= worker_id < self.num_workers:
            raise ValueError(f"worker id {worker_id} outside 0..{self.num_workers - 1}")
        inbox = _socket(zmq.PULL, self.inbox_addresses[worker_id], bind=True)  # a dead predecessor's file is replaced
        commands = commands or {}
        pending: queue.SimpleQueue = queue.SimpleQueue()  # (op, token, consumer, argument), in arrival order

        def answer(sockets: dict[int, zmq.Socket], token: str, consumer: int, run: Callable[[Any], dict], arg) -> None:
            try:
                reply = run(arg)
            except Exception as e:  # noqa: BLE001 - reported to the asker, not fatal
                status = getattr(e, "http_status", None)  # the request's fault (admin.CommandRefused)
                if isinstance(status, int):
                    reply = {"error": str(e), "status": status, "param": getattr(e, "param", None)}
                else:
                    reply = {"error": f"{type(e).__name__}: {e}"}
            sock = sockets.get(consumer)
            if sock is None:  # each thread its own sockets (ZeroMQ sockets are not thread-safe)
                sock = sockets[consumer] = _socket(zmq.PUSH, self.reply_addresses[consumer], bind=False)
            sock.send(pickle.dumps({**reply, "token": token, "worker": worker_id}))

        def run_commands() -> None:
            sockets: dict[int, zmq.Socket] = {}
            while True:
                op, token, consumer, payload = pending.get()
                answer(sockets, token, consumer, commands[op], payload)

        def loop() -> None:
            sockets: dict[int, zmq.Socket] = {}  # consumer -> PUSH socket, this thread's own
            while True:
                try:
                    op, arg = pickle.loads(inbox.recv())
                except zmq.ZMQError:  # the context is gone: the process is ending
                    return
                if op == "abort":
                    on_abort(arg)
                    continue
                token, consumer, *rest = arg  # (token, consumer[, the command's argument])
                if op in commands:
                    pending.put((op, token, consumer, rest[0] if rest else None))
                elif op == "stats":
                    answer(sockets, token, consumer, lambda _: describe(), None)
                else:
                    answer(sockets, token, consumer, _unknown, op)

        threading.Thread(target=run_commands, name=f"astrai-commands-{worker_id}", daemon=True).start()
        thread = threading.Thread(target=loop, name=f"astrai-control-{worker_id}", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        """Close this process's sockets; the process that made the plane also removes the files."""
        for sock in [*self._inboxes.values(), *self._replies.values()]:
            sock.close(linger=0)
        self._inboxes.clear()
        self._replies.clear()
        if self._owner_pid == os.getpid():
            remove_socket_files(self.inbox_addresses + self.reply_addresses)


def _unknown(op: str) -> dict:
    raise ValueError(f"unknown control operation {op!r}")


def _socket(kind: int, address: str, bind: bool) -> zmq.Socket:
    # No linger: an exit never waits for a worker or an HTTP process that is gone.
    return open_socket(zmq.Context.instance(), kind, address, bind=bind)


def combine_stats(workers: list[dict[str, Any]]) -> dict[str, Any]:
    """The engines' statistics as one: counts and rates add up across engines (tokens_per_s
    too: they run side by side); see _SMALLEST and _MEAN for the rest. Workers that did not
    answer are left out."""
    answered = [w["stats"] for w in workers if isinstance(w.get("stats"), dict)]
    if not answered:
        return {}
    if len(answered) == 1:
        return dict(answered[0])
    out: dict[str, Any] = {}
    for key in answered[0]:
        values = [s[key] for s in answered if key in s]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if not numeric:
            out[key] = values[0] if all(v == values[0] for v in values) else values
        elif key in _SMALLEST:
            out[key] = min(values)
        elif key in _MEAN:
            out[key] = sum(values) / len(values)
        else:
            out[key] = sum(values)
    return out
