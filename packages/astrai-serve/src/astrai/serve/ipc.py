"""ZeroMQ ipc sockets as the server's three channels use them (requests: request_queue.py,
replies: transport.py, aborts and stats: control_plane.py): addresses made in the main
process, sockets that never block a sender (no high-water mark) and the socket files removed
by the process that made them."""

from __future__ import annotations

import os
import tempfile
import uuid

import zmq


def ipc_addresses(kind: str, count: int, directory: str | None = None) -> list[str]:
    """`count` fresh ipc addresses for one channel, in `directory` (default: the temp dir)."""
    base = os.path.join(directory or tempfile.gettempdir(), f"astrai-{kind}-{uuid.uuid4().hex[:12]}")
    return [f"ipc://{base}-{i}.ipc" for i in range(count)]


def open_socket(context: zmq.Context, kind: int, address: str, *, bind: bool, linger_ms: int = 0) -> zmq.Socket:
    """A socket of `context` bound or connected to `address`, queueing without limit (a sender
    never blocks) and waiting `linger_ms` at close for what it still holds. Binding replaces the
    socket file a dead process left behind."""
    sock = context.socket(kind)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, linger_ms)
    if bind:
        sock.bind(address)
    else:
        sock.connect(address)
    return sock


def remove_socket_files(addresses: list[str]) -> None:
    for address in addresses:
        try:
            os.unlink(address.removeprefix("ipc://"))
        except OSError:  # never bound, or already gone
            pass
