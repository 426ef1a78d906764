"""A streamed response closes its body generator when the client leaves mid-write, so the
generator's clean-up (the engine abort) runs at once instead of whenever the GC finds it."""

from __future__ import annotations

import asyncio
import gc

import pytest
from starlette.requests import ClientDisconnect

from astrai.serve.server import _ClosingStreamingResponse


def _run(spec_version: str) -> list[str]:
    log: list[str] = []

    async def body():
        try:
            while True:
                yield "data: x\n\n"
        finally:
            log.append("closed")

    async def receive():
        await asyncio.sleep(3600)  # the client never sends a disconnect message first

    async def send(message):
        if message["type"] == "http.response.body":
            raise OSError("connection reset by peer")  # the write that finds the client gone

    response = _ClosingStreamingResponse(body(), media_type="text/event-stream", on_close=lambda: log.append("forgot"))
    scope = {"type": "http", "asgi": {"spec_version": spec_version}}

    async def main():
        with pytest.raises((ClientDisconnect, OSError)):
            await response(scope, receive, send)
        log.append("returned")

    gc.disable()  # nothing may depend on the collector
    try:
        asyncio.run(main())
    finally:
        gc.enable()
    return log


@pytest.mark.parametrize("spec_version", ["2.4", "2.3"])
def test_body_generator_is_closed_when_the_write_fails(spec_version):
    assert _run(spec_version) == ["closed", "forgot", "returned"]


def test_a_stream_whose_body_never_started_still_forgets_its_request():
    log: list[str] = []

    async def body():
        log.append("started")
        yield "data: x\n\n"

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        raise OSError("connection reset by peer")  # fails on the headers, before the body runs

    response = _ClosingStreamingResponse(body(), media_type="text/event-stream", on_close=lambda: log.append("forgot"))

    async def main():
        with pytest.raises((ClientDisconnect, OSError)):
            await response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send)

    asyncio.run(main())
    assert log == ["forgot"]
