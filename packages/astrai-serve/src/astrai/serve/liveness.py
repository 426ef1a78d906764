"""Which engine workers are alive, seen from the HTTP process: a dead worker must not hang its clients.

LitServe notices a dead worker only on its monitor's tick in the main process, and then either
shuts the whole server down or starts a new worker; the requests the dead one held are never
answered, and /health keeps saying "ok" in the meantime. So each worker writes its process id
into a slot of a shared array once its engine is ready, and the HTTP process checks those
processes itself (a signal-0 probe and the process state in /proc, which also tells a dead,
not yet reaped process from a live one): no heartbeat to miss, no false alarm for a worker busy
with a long engine step.

The same arrays give restarts a backoff: a worker that starts again soon after its slot's last
start waits 0.5 s, 1 s, 2 s ... (at most MAX_BACKOFF_S) before loading its model, so a worker
that crashes at start-up cannot spin; a worker that served for STABLE_AFTER_S resets the count.

Made in the main process before LitServe starts its processes, like the control plane: spawned
workers receive it with the LitAPI, the forked HTTP process inherits it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time

MAX_BACKOFF_S = 30.0
STABLE_AFTER_S = 60.0


def process_alive(pid: int) -> bool:
    """True while process ``pid`` runs (a zombie, dead but not yet reaped, counts as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (not Linux): signal 0 is all we can tell
    return state not in (b"Z", b"X")


def backoff_delay(starts: int) -> float:
    """Seconds to wait before the ``starts``-th quick start of a slot (0 for the first)."""
    return 0.0 if starts <= 0 else min(MAX_BACKOFF_S, 0.5 * 2 ** (starts - 1))


class WorkerLiveness:
    def __init__(self, num_workers: int) -> None:
        ctx = mp.get_context("spawn")
        self.pids = ctx.Array("q", num_workers)  # 0: not serving (starting, or never started)
        self.starts = ctx.Array("i", num_workers)  # quick starts in a row, per slot
        self.last_start = ctx.Array("d", num_workers)  # time.time() of the slot's last start

    @property
    def num_workers(self) -> int:
        return len(self.pids)

    # -- worker side --------------------------------------------------------------------
    def starting(self, worker: int) -> float:
        """A worker begins its set-up: returns how long it should wait first (the backoff)."""
        now = time.time()
        with self.starts.get_lock():
            if now - self.last_start[worker] > STABLE_AFTER_S:
                self.starts[worker] = 0
            delay = backoff_delay(self.starts[worker])
            self.starts[worker] += 1
            self.last_start[worker] = now + delay
        self.pids[worker] = 0
        return delay

    def ready(self, worker: int, pid: int | None = None) -> None:
        self.pids[worker] = pid or os.getpid()

    # -- HTTP side ----------------------------------------------------------------------
    def pid(self, worker: int) -> int:
        return self.pids[worker]

    def serving(self) -> list[bool]:
        """Per worker: its engine is ready and its process alive."""
        return [process_alive(self.pids[i]) for i in range(self.num_workers)]
