"""Every process a server starts ends when the server's main process is gone.

LitServe's inference workers (spawned), its HTTP processes and its manager (forked) keep running
if the main process dies without shutting them down: the OOM killer, `kill -9`, a container
runtime's SIGKILL after its grace period. An orphaned worker keeps its GPU memory and an
orphaned HTTP process keeps the port, so the next `astrai-serve` cannot start. Each of them
therefore watches its parent and exits once it has changed (the process was re-parented).

A thread that polls getppid() rather than Linux's PR_SET_PDEATHSIG: the signal follows the
*thread* that started the child (LitServe restarts workers from a monitor thread), and it does
not exist on macOS.
"""

from __future__ import annotations

import os
import threading
import time

POLL_S = 0.5


def exit_with_parent(poll_s: float = POLL_S) -> None:
    """Start a daemon thread that ends this process (exit status 1) once its parent is gone."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)  # nothing is left to report to; at-exit joins could wait for siblings forever

    threading.Thread(target=watch, name="astrai-parent-watch", daemon=True).start()
