"""Request errors and their JSON shapes in the OpenAI and Anthropic protocols.

Handlers raise `APIError`; the route turns it into the error body of the protocol the
client speaks, so an OpenAI client sees `openai.BadRequestError` and an Anthropic client
`anthropic.BadRequestError`, each with a message that names the field and the fix.
"""

from __future__ import annotations

from typing import Any

# Anthropic names error kinds by status code rather than by cause.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


class APIError(Exception):
    """A client-facing error: HTTP status, message, and the offending request field."""

    def __init__(
        self, status: int, message: str, param: str | None = None, type: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.code = code


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def openai_error_body(err: APIError) -> dict[str, Any]:
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


def anthropic_error_body(err: APIError) -> dict[str, Any]:
    kind = _ANTHROPIC_TYPES.get(err.status, "invalid_request_error" if err.status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": err.message}}
