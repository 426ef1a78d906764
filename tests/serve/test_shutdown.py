"""Stopping a server under load leaves no process behind: real `astrai-serve` subprocesses, real
signals, real long requests in flight.

- A second SIGTERM during the graceful shutdown (a second Ctrl-C, or `uv run` passing on a SIGTERM
  the server also got) used to cut the shutdown short before LitServe stopped the inference
  worker; the main process then waited for that worker at exit forever.
- `kill -9` of the main process (the OOM killer, a container runtime) used to leave the worker,
  holding its GPU memory, and the HTTP process, holding the port.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest


def _group(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, _ppid, group = stat.rpartition(")")[2].split()[:3]
        if int(group) == pgid and state != "Z":
            alive.append(int(entry.name))
    return alive


def _wait_gone(pgid: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := _group(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _load(url: str, n: int) -> None:
    """n long completions in flight (their answers do not matter: the server is going away)."""

    def one() -> None:
        try:
            httpx.post(
                url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1500, "ignore_eos": True}, timeout=60
            )
        except httpx.HTTPError:
            pass

    for _ in range(n):
        threading.Thread(target=one, daemon=True).start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # until the engine holds them
        if httpx.get(url + "/stats", timeout=5).json()["engine"]["running"] > 0:
            return
        time.sleep(0.1)
    raise AssertionError("the requests never reached the engine")


def _port_free(port: int) -> bool:
    """Whether a new server could listen on ``port`` (as servers do, past TIME_WAIT connections)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_a_second_stop_signal_during_the_graceful_shutdown_still_ends_every_process(cpu_server):
    server = cpu_server()
    pgid = server.proc.pid
    assert len(_group(pgid)) >= 3  # main, the HTTP process, the inference worker
    _load(server.url, 8)
    os.kill(server.proc.pid, signal.SIGTERM)
    time.sleep(0.3)  # inside the shutdown: uvicorn waits for the requests in flight
    os.kill(server.proc.pid, signal.SIGTERM)
    assert server.proc.wait(timeout=20) == 130
    assert _wait_gone(pgid, 10) == [], "processes outlived the server"
    assert "SIGTERM again: stopping the workers now" in server.log.read_text()
    assert _port_free(server.port)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_killing_the_main_process_ends_the_worker_and_frees_the_port(cpu_server):
    server = cpu_server()
    pgid = server.proc.pid
    _load(server.url, 4)
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(timeout=10)
    assert _wait_gone(pgid, 10) == [], "the worker or the HTTP process outlived the main process"
    assert _port_free(server.port)
