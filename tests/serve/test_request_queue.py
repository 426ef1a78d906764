"""RoutedRequestQueue: each request reaches the worker it was sent to, all waiting ones in one
take, and a worker started in a killed one's place gets new requests but not its predecessor's.
Real processes (spawned, as LitServe spawns workers) and a real SIGKILL."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import time

import pytest

from astrai.serve.request_queue import RoutedRequestQueue


def _serve(queue: RoutedRequestQueue, worker: int, results, count: int) -> None:
    """A worker process: bind, then report (pid, what each take_all returned) until `count` items."""

    async def main() -> None:
        queue.bind(worker)
        results.put(("ready", os.getpid()))
        got = 0
        while got < count:
            taken = await queue.take_all(timeout=0.2)
            if taken:
                results.put(("taken", os.getpid(), taken))
                got += len(taken)

    asyncio.run(main())


def _start(queue: RoutedRequestQueue, worker: int, results, count: int) -> mp.Process:
    process = mp.get_context("spawn").Process(target=_serve, args=(queue, worker, results, count), daemon=True)
    process.start()
    kind, pid = results.get(timeout=60)
    assert (kind, pid) == ("ready", process.pid)
    return process


def _takes(results, count: int) -> list[list]:
    takes, got = [], 0
    while got < count:
        kind, _, taken = results.get(timeout=30)
        takes.append(taken)
        got += len(taken)
    return takes


def test_requests_reach_the_worker_they_were_sent_to_in_order(tmp_path):
    queue = RoutedRequestQueue(2, directory=str(tmp_path))
    results = mp.get_context("spawn").Queue()
    workers = [_start(queue, w, results, 20) for w in range(2)]
    try:
        for i in range(20):
            for w, process in enumerate(workers):
                queue.put(("consumer", f"w{w}-{i}", 0.0, {"i": i}), w, process.pid)
        by_pid: dict[int, list] = {}
        for _ in range(100):
            if sum(len(v) for v in by_pid.values()) == 40:
                break
            kind, pid, taken = results.get(timeout=30)
            by_pid.setdefault(pid, []).extend(taken)
        for w, process in enumerate(workers):
            assert [item[1] for item in by_pid[process.pid]] == [f"w{w}-{i}" for i in range(20)]
    finally:
        for process in workers:
            process.kill()
        queue.close()


def test_a_burst_sent_before_the_worker_looks_is_taken_in_one_call(tmp_path):
    queue = RoutedRequestQueue(1, directory=str(tmp_path))
    results = mp.get_context("spawn").Queue()
    # Sent before the worker exists: ZeroMQ holds them until it binds, then they all wait at once.
    for i in range(64):
        queue.put(("c", f"u{i}", 0.0, {}), 0, 0)
    worker = _start(queue, 0, results, 64)
    try:
        takes = _takes(results, 64)
        assert [item[1] for take in takes for item in take] == [f"u{i}" for i in range(64)]
        assert len(takes[0]) == 64
    finally:
        worker.kill()
        queue.close()


def test_nothing_waiting_returns_an_empty_take_after_the_timeout(tmp_path):
    queue = RoutedRequestQueue(1, directory=str(tmp_path))

    async def main() -> tuple[list, float]:
        queue.bind(0)
        start = time.monotonic()
        return await queue.take_all(timeout=0.2), time.monotonic() - start

    try:
        taken, waited = asyncio.run(main())
    finally:
        queue.close()
    assert taken == [] and 0.15 < waited < 5


def test_a_worker_started_in_a_killed_ones_place_gets_new_requests_but_drops_its_predecessors(tmp_path):
    queue = RoutedRequestQueue(1, directory=str(tmp_path))
    results = mp.get_context("spawn").Queue()
    first = _start(queue, 0, results, 1_000_000)
    try:
        queue.put(("c", "before", 0.0, {}), 0, first.pid)
        assert [item[1] for item in _takes(results, 1)[0]] == ["before"]
        os.kill(first.pid, signal.SIGKILL)
        first.join(timeout=10)
        # Sent to the dead process (the HTTP side has not noticed yet): nobody must run these.
        for i in range(5):
            queue.put(("c", f"for-the-dead-{i}", 0.0, {}), 0, first.pid)
        # The successor reports on a queue of its own: a process killed right after writing to
        # a multiprocessing queue can die holding its write lock, and every later writer waits.
        fresh = mp.get_context("spawn").Queue()
        second = _start(queue, 0, fresh, 3)
        try:
            for i in range(3):
                queue.put(("c", f"after-{i}", 0.0, {}), 0, second.pid)
            takes = _takes(fresh, 3)
            assert [item[1] for take in takes for item in take] == [f"after-{i}" for i in range(3)]
        finally:
            second.kill()
    finally:
        first.kill()
        queue.close()


def test_take_all_before_bind_says_so():
    queue = RoutedRequestQueue(1)
    with pytest.raises(RuntimeError, match="bind"):
        asyncio.run(queue.take_all(timeout=0.01))
    queue.close()
