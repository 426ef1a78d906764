"""What every HTTP request must pass before any route sees it: the API key and the body size.

This is a plain ASGI middleware, installed through LitServer's public `middlewares=` argument,
rather than LitServe's own hooks, because those do not cover enough:

- LitServe's auth dependency (`LitAPI.authorize`) guards the routes LitServe adds itself,
  /health included (which must stay open for probes), but not FastAPI's /docs, /redoc and
  /openapi.json, nor anything a later LitServe or FastAPI version adds.
- LitServe's MaxSizeMiddleware notices an oversized body only while a route reads it, and
  answers in FastAPI's {"detail": ...} shape rather than the protocol's error shape.

A middleware sees every request whichever library added the route, allows /health (and the
static chat page) by name only, and decides from the headers before a byte of the body is read; nothing of LitServe's
internals is patched, so a LitServe upgrade cannot silently open a route.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

from .config import format_size
from .errors import APIError, anthropic_error_body, openai_error_body

OPEN_PATHS = frozenset({"/health"})  # load balancers and orchestrators probe it without a key
# The chat page (static/chat.html) is open too when served: it holds no data, and asks the
# person for the key that its own requests then carry.
CHAT_PAGE = "/"
_BODYLESS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class RequestGuard:
    """Refuses requests without the API key (401) and bodies over the limit (413), in the error
    shape of the protocol the client speaks. `rejected(path, status)` is told of each refusal."""

    def __init__(
        self,
        app,
        *,
        api_key: str | None,
        max_request_bytes: int,
        rejected: Callable[[str, int], None] | None = None,
        open_paths: frozenset[str] = OPEN_PATHS,
        admin_key: str | None = None,
        admin_prefix: str | None = None,
    ) -> None:
        self.app = app
        self.open_paths = open_paths
        self.key = api_key.encode() if api_key else None
        # Paths under admin_prefix (weight updates, admin.py) take admin_key instead; none: they are off.
        self.admin_key = admin_key.encode() if admin_key else None
        self.admin_prefix = admin_prefix
        self.limit = max_request_bytes
        self.rejected = rejected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and self.key and not self._has_key(_headers(scope)):
            await send({"type": "websocket.close", "code": 1008})  # policy violation
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        error = self._check_key(scope, headers) or self._check_length(headers)
        if error is None and scope["method"] not in _BODYLESS and "content-length" not in headers:
            # No declared length (chunked): read up to the limit here and hand the body on.
            body, error = await self._read_capped(receive)
            if error is None:
                receive = _replay(body, receive)
        if error is not None:
            await self._refuse(scope, headers, error, send)
            return
        await self.app(scope, receive, send)

    # -- the checks ---------------------------------------------------------------------
    def _has_key(self, headers: dict[str, str], key: bytes | None = None) -> bool:
        key = self.key if key is None else key
        auth = headers.get("authorization", "")
        bearer = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        sent = headers.get("x-api-key", "")
        # compare_digest on both, always: how long a check takes says nothing about the key.
        by_bearer = hmac.compare_digest(bearer.encode("latin-1"), key)
        by_header = hmac.compare_digest(sent.encode("latin-1"), key)
        return by_bearer or by_header

    def _check_admin_key(self, headers: dict[str, str]) -> APIError | None:
        if self.admin_key is None:
            return APIError(
                403,
                "the admin endpoints are off: start the server with --admin-key KEY (or --api-key KEY)",
                type="permission_error",
            )
        if self._has_key(headers, self.admin_key):
            return None
        state = "invalid" if headers.get("authorization") or headers.get("x-api-key") else "missing"
        return APIError(
            401,
            f"admin key {state}; send the server's admin key as 'Authorization: Bearer <key>'",
            type="authentication_error",
            code="invalid_api_key",
        )

    def _check_key(self, scope: Scope, headers: dict[str, str]) -> APIError | None:
        if self.admin_prefix and scope["path"].startswith(self.admin_prefix):
            return self._check_admin_key(headers)
        if self.key is None or scope["path"] in self.open_paths or self._has_key(headers):
            return None
        how = "'x-api-key: <key>'" if _speaks_anthropic(scope, headers) else "'Authorization: Bearer <key>'"
        sent = headers.get("authorization") or headers.get("x-api-key")
        state = "invalid" if sent else "missing"
        return APIError(
            401, f"API key {state}; send the server's key as {how}", type="authentication_error", code="invalid_api_key"
        )

    def _check_length(self, headers: dict[str, str]) -> APIError | None:
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            return self._too_large(f" ({format_size(int(declared))})")
        return None

    async def _read_capped(self, receive: Receive) -> tuple[bytes, APIError | None]:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left; let the route see it
                return b"".join(chunks), None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return b"", self._too_large(" (sent in chunks)")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None

    def _too_large(self, detail: str) -> APIError:
        limit = format_size(self.limit)
        exact = "" if limit.endswith("bytes") else f" ({self.limit} bytes)"
        return APIError(
            413,
            f"request body{detail} is larger than this server's limit of {limit}{exact}; send a "
            f"smaller request, or start the server with a larger --max-request-bytes (now {limit})",
            type="invalid_request_error",
            code="request_too_large",
        )

    async def _refuse(self, scope: Scope, headers: dict[str, str], error: APIError, send: Send) -> None:
        """Answer without reading the body. No 'Connection: close': uvicorn then reads and drops the
        rest of the body itself, so the client finishes sending and gets this answer, not a reset."""
        if self.rejected is not None:
            self.rejected(scope["path"], error.status)
        shape = anthropic_error_body if _speaks_anthropic(scope, headers) else openai_error_body
        body = json.dumps(shape(error)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _headers(scope: Scope) -> dict[str, str]:
    return {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope.get("headers", [])}


def _speaks_anthropic(scope: Scope, headers: dict[str, str]) -> bool:
    """Anthropic clients call /v1/messages and send anthropic-version on every request."""
    return scope["path"].startswith("/v1/messages") or "anthropic-version" in headers


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that returns the body read already, then whatever the connection says next
    (a disconnect, which the routes poll for)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
