"""A side channel from the HTTP process to every engine worker: aborts and statistics.

Requests travel to one worker each (request_queue.py), read by the worker's request loop
only between its bursts; an abort must reach the engine that holds the request at once, and
/stats must hear from every engine, busy or not. So each worker gets an inbox of its own (indexed by LitServe's worker id) and all answers come back on one reply
queue. Aborts go to every inbox: only the engine holding the request acts on them, the others
just remember the id (in case the request has not reached them yet, it never will).

The queues are made in the main process before LitServe starts its processes: the workers
receive them when they are spawned, the HTTP process (forked) inherits them.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from .liveness import WorkerLiveness

log = logging.getLogger("astrai.serve")

# Engine statistics that are the same for every engine, or that do not add up: the combined
# /stats shows the smallest (max_model_len: what every engine can serve) or the mean.
_SMALLEST = ("page_size", "max_model_len", "weights_version")
_MEAN = ("prefix_cache_hit_rate",)


class ControlPlane:
    def __init__(self, num_workers: int, num_consumers: int = 1) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {num_workers}")
        if num_consumers < 1:
            raise ValueError(f"num_consumers must be at least 1, got {num_consumers}")
        ctx = mp.get_context("spawn")
        self.inboxes = [ctx.Queue() for _ in range(num_workers)]
        # One reply queue per API-server process (consumer): each reads only its own answers.
        self.replies = [ctx.Queue() for _ in range(num_consumers)]
        self.liveness = WorkerLiveness(num_workers)  # which workers' engines serve (liveness.py)
        self._lock = threading.Lock()

    @property
    def num_workers(self) -> int:
        return len(self.inboxes)

    @property
    def num_consumers(self) -> int:
        return len(self.replies)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- HTTP side ----------------------------------------------------------------------
    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def _send(self, message: tuple[str, Any]) -> None:
        for inbox in self.inboxes:
            inbox.cancel_join_thread()  # exit must not wait for a worker that stopped reading
            inbox.put(message)

    def stats(self, timeout: float = 10.0, consumer: int = 0) -> list[dict[str, Any]]:
        """One entry per worker, in worker order: {"worker", "device", "stats", ...}, or
        {"worker", "error"} for a worker that did not answer within `timeout` seconds.

        Blocking: call it from a thread of API-server process `consumer`, whose reply queue
        the answers come back on. Calls are serialised within that process, so the answers of
        one call cannot be taken by another; answers to an earlier call that timed out are
        dropped.
        """
        with self._lock:
            token = uuid.uuid4().hex
            self._send(("stats", (token, consumer)))
            answers: dict[int, dict] = {}
            deadline = time.monotonic() + timeout
            while len(answers) < self.num_workers:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    answer = self.replies[consumer].get(timeout=left)
                except queue.Empty:
                    break
                if answer.pop("token", None) == token:
                    answers[answer["worker"]] = answer
        return [
            answers.get(i) or {"worker": i, "error": f"no answer within {timeout:g} s"} for i in range(self.num_workers)
        ]

    # -- worker side --------------------------------------------------------------------
    def serve(
        self, worker_id: int, on_abort: Callable[[str], None], describe: Callable[[], dict[str, Any]]
    ) -> threading.Thread:
        """Answer this worker's inbox on a daemon thread: aborts call `on_abort(request_id)`,
        stats requests are answered with `describe()` (a dict with "stats" and more)."""
        if not 0 <= worker_id < self.num_workers:
            raise ValueError(f"worker id {worker_id} outside 0..{self.num_workers - 1}")
        inbox = self.inboxes[worker_id]
        _reclaim_reader_lock(inbox)
        # Never let process exit wait on unread answers (the HTTP process may be gone).
        for replies in self.replies:
            replies.cancel_join_thread()

        def loop() -> None:
            while True:
                try:
                    op, arg = inbox.get()
                except (EOFError, OSError):  # the main process is gone: shutting down
                    return
                if op == "abort":
                    on_abort(arg)
                elif op == "stats":
                    token, consumer = arg
                    try:
                        answer = describe()
                    except Exception as e:  # noqa: BLE001 - reported in /stats, not fatal
                        answer = {"error": f"{type(e).__name__}: {e}"}
                    self.replies[consumer].put({**answer, "token": token, "worker": worker_id})

        thread = threading.Thread(target=loop, name=f"astrai-control-{worker_id}", daemon=True)
        thread.start()
        return thread


def _reclaim_reader_lock(inbox) -> None:
    """A worker killed while it waits on its inbox dies holding the inbox's reader lock (a
    multiprocessing Queue's `_rlock`), and the worker started in its place would wait for that
    lock forever: aborts and /stats would never reach it. Each inbox has one reader, the worker
    of its slot, so a lock found taken when a worker starts belongs to a dead process: release it."""
    lock = inbox._rlock
    if not lock.acquire(block=False):
        log.warning("the control inbox's reader lock was held by a dead worker; released it")
    lock.release()


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
