"""The Anthropic Messages request body (/v1/messages) as a pydantic model.

Errors read as Anthropic's do ("messages.0.role: ..."), except for the sampling fields, which
share the OpenAI routes' wording; request_models.py says how fields are checked. Field order is
the order errors are reported in. What depends on the served model (the context length, the
chat template) is checked in anthropic_protocol.py.
"""

from typing import Annotated, Any, Literal

from pydantic import Field

from .errors import APIError, bad_request
from .request_models import (
    Anything,
    Flag,
    Part,
    RequestModel,
    Wording,
    integer,
    number,
    raw_at,
    sequences,
    text_or,
)


class TextBlock(Part):
    """A text content block (the model reads text: images and documents are refused)."""

    type: Literal["text"]
    text: str


class ToolUseBlock(Part):
    """A call an earlier assistant turn made."""

    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(Part):
    """A tool's answer to a call, in a user turn."""

    type: Literal["tool_result"]
    tool_use_id: str
    content: text_or(TextBlock) | None = None
    is_error: bool | None = None


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")]


class Message(Part):
    role: Literal["user", "assistant"]
    content: text_or(Block)


class Tool(Part):
    """A client tool: Anthropic's server tools (web search, code execution...) are not ours to run."""

    type: Literal["custom"] | None = None
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    input_schema: dict[str, Any]


class ToolChoice(Part):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


Tools = Annotated[
    list[Tool],
    Wording(
        message='tools: must be a list of {"name", "description", "input_schema"} objects (client tools; a name '
        "is 1-64 letters, digits, _ or -, input_schema a JSON schema object)"
    ),
]
ToolChoiceField = Annotated[
    ToolChoice,
    Wording(message='tool_choice: must be {"type": "auto" | "any" | "tool" | "none"}, with "name" for "tool"'),
]


def _text_error(error: dict, body: dict, at: int, where: str) -> APIError:
    """An error inside a string-or-blocks value whose location is error["loc"][:at]."""
    loc = error["loc"]
    if len(loc) > at + 1 and isinstance(loc[at + 1], int):
        block = raw_at(body, loc[: at + 2])
        kind = block.get("type") if isinstance(block, dict) else type(block).__name__
        where = f"{where}.{loc[at + 1]}"
        if len(loc) > at + 3 and kind in ("text", "tool_use", "tool_result"):
            field = ".".join(str(k) for k in loc[at + 3 :] if k not in ("string", "list"))
            return bad_request(f"{where}.{field}: {error['msg']} (in a {kind!r} block)", f"{where}.{field}")
        return bad_request(
            f"{where}: content block of type {kind!r} is not supported; send text, tool_use (assistant) or "
            "tool_result (user) blocks (this model reads text only)",
            where,
        )
    content = raw_at(body, loc[:at])
    return bad_request(f"{where}: must be a string or a list of text blocks, got {type(content).__name__}", where)


def _messages_error(error: dict, body: dict) -> APIError:
    loc = error["loc"]
    if len(loc) == 1:
        return bad_request('messages: must be a non-empty list of {"role", "content"} objects', "messages")
    where = f"messages.{loc[1]}"
    if len(loc) == 2:
        return bad_request(f"{where}: must be an object with 'role' and 'content'", where)
    if loc[2] == "role":
        role = raw_at(body, loc[:3])
        hint = " (put the system prompt in the top-level 'system' field)" if role == "system" else ""
        return bad_request(
            f"{where}.role: {role!r} is not a valid role; use 'user' or 'assistant'{hint}", f"{where}.role"
        )
    return _text_error(error, body, 3, f"{where}.content")


class MessagesRequest(RequestModel):
    """POST /v1/messages. A final assistant message is a prefill: the reply continues it."""

    model: str | None = None
    tools: Tools = None
    tool_choice: ToolChoiceField = Field(None, description='default {"type": "auto"} with tools')
    thinking: Annotated[Any, Field(description='{"type": "enabled"} is refused (no extended thinking)')] = None
    max_tokens: Annotated[
        integer(1), Wording(required="max_tokens: Field required; set the most tokens to generate, e.g. 1024")
    ]
    stop_sequences: sequences() = []
    temperature: number(0.0, 1.0) = 1.0
    top_p: number(0.0, 1.0, lo_open=True) = 1.0
    top_k: integer(0) = 0
    ignore_eos: Flag = False  # vLLM's extra, as on the OpenAI routes
    messages: Annotated[
        list[Message],
        Field(min_length=1),
        Wording(
            required='messages: Field required; send a list of {"role": "user", "content": "..."}',
            explain=_messages_error,
        ),
    ]
    system: Annotated[text_or(TextBlock), Wording(explain=lambda e, body: _text_error(e, body, 1, "system"))] = None
    stream: Flag = False
    # A user id for abuse tracking, and the service tier: accepted and ignored (no change to the answer).
    metadata: Anything = None
    service_tier: Anything = None


IGNORED = ("metadata", "service_tier")
