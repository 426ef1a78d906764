"""Server-sent events: the one-line JSON both protocols' streams are written in, and the streaming
response that closes its body generator however the response ends. Kept apart from server.py,
the routes that use them.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from fastapi.responses import StreamingResponse

# Characters that JSON leaves raw but that str.splitlines() (httpx's aiter_lines, many SSE
# clients) treats as line breaks: raw, they would cut an event's data line in two.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _json_line(data) -> str:
    """JSON on one line for any line splitter; other non-ASCII text stays readable (UTF-8)."""
    text = json.dumps(data, ensure_ascii=False)
    # translate() looks up every character in Python: only pay for it when there is a break.
    if "\u2028" in text or "\u2029" in text or "\x85" in text:
        return text.translate(_LINE_BREAKS)
    return text


def _sse_openai(item: dict) -> str:
    return f"data: {_json_line(item)}\n\n"


def _sse_anthropic(item: tuple[str, dict]) -> str:
    name, data = item
    return f"event: {name}\ndata: {_json_line(data)}\n\n"


class _ClosingStreamingResponse(StreamingResponse):
    """Closes its body generator however the response ends. When the client leaves while a chunk
    is being written, Starlette abandons the generator at its `yield`, and its clean-up (the
    engine abort in `_stream`) would wait for the garbage collector."""

    def __init__(self, *args, on_close: Callable[[], None], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.on_close = on_close  # runs even when the body never started

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                self.on_close()
