"""Worker liveness as the HTTP process sees it: real child processes, killed and reaped or not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from astrai.serve.liveness import MAX_BACKOFF_S, WorkerLiveness, backoff_delay, process_alive


def test_a_running_process_is_alive_and_a_killed_one_is_not_even_before_it_is_reaped():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert process_alive(child.pid) and process_alive(os.getpid())
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while process_alive(child.pid) and time.monotonic() < deadline:  # a zombie until waited for
            time.sleep(0.01)
        assert not process_alive(child.pid)
        assert child.poll() == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()
    assert not process_alive(child.pid) and not process_alive(0) and not process_alive(-1)


def test_restarts_back_off_and_a_slot_serves_only_once_ready():
    assert [backoff_delay(n) for n in range(5)] == [0.0, 0.5, 1.0, 2.0, 4.0]
    assert backoff_delay(40) == MAX_BACKOFF_S
    liveness = WorkerLiveness(2)
    assert liveness.starting(0) == 0.0  # the first start waits for nothing
    assert liveness.serving() == [False, False]
    liveness.ready(0)
    assert liveness.serving() == [True, False] and liveness.pid(0) == os.getpid()
    assert liveness.starting(0) == 0.5  # started again at once: waits, and no longer serves
    assert liveness.serving() == [False, False]
    assert liveness.starting(0) == 1.0
