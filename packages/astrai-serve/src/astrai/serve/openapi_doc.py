"""What /openapi.json shows for the generation routes: their request bodies and the responses a
client can get, errors included, each in the shape of the protocol the route speaks.

The routes take a plain Request (RequestGuard checks the key and the size, our own reader the
JSON), so FastAPI can infer neither the body nor the errors; both are attached as each route's
`openapi_extra`, and the models' definitions are added to components/schemas when the document
is first built (FastAPI's documented way to extend it: replace `app.openapi`). A client
generated from the document then knows the error bodies it must parse, as vLLM's does.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorResponse(BaseModel):
    """The body of every error of the OpenAI routes (errors.openai_error_body)."""

    error: OpenAIErrorDetail


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicErrorResponse(BaseModel):
    """The body of every error of /v1/messages (errors.anthropic_error_body)."""

    type: Literal["error"]
    error: AnthropicErrorDetail


# The statuses a generation route answers besides 200, and when.
ERROR_STATUSES = {
    400: "the request is not valid: the message names the field and what it must be",
    401: "the API key is missing or wrong (servers started with --api-key)",
    404: "'model' names a model this server does not serve (GET /v1/models lists it)",
    413: "the body is larger than the server's --max-request-bytes",
    500: "the inference worker failed on this request",
    503: "no inference worker is serving right now (one restarts after a failure): retry",
}
SUCCESS = "the completion: one JSON object, or with 'stream': true a text/event-stream of events (server-sent events)"


def install_openapi_doc(app: Any, models: dict[str, type[BaseModel]], anthropic_paths: set[str]) -> None:
    """Show `models[path]` as the request body of each POST `path`, and its error responses in
    Anthropic's shape where `path` is in `anthropic_paths`, OpenAI's elsewhere."""
    from fastapi.routing import APIRoute

    bodies = [*models.values(), OpenAIErrorResponse, AnthropicErrorResponse]
    components: dict[str, Any] = {}
    for model in bodies:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, definition in {**schema.pop("$defs", {}), model.__name__: schema}.items():
            if components.setdefault(name, definition) != definition:
                raise ValueError(f"two request models define a different {name!r}; rename one")
    for route in app.routes:
        if isinstance(route, APIRoute) and route.path in models and "POST" in route.methods:
            error = AnthropicErrorResponse if route.path in anthropic_paths else OpenAIErrorResponse
            route.openapi_extra = {
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref(models[route.path])}},
                },
                "responses": _responses(_ref(error)),
            }
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            build().setdefault("components", {}).setdefault("schemas", {}).update(components)
        return app.openapi_schema

    app.openapi = openapi


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _responses(error: dict[str, str]) -> dict[str, Any]:
    success = {"description": SUCCESS, "content": {"application/json": {}, "text/event-stream": {}}}
    errors = {
        str(status): {"description": why, "content": {"application/json": {"schema": error}}}
        for status, why in ERROR_STATUSES.items()
    }
    return {"200": success, **errors}
