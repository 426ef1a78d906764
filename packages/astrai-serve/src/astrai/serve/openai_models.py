"""The OpenAI request bodies as pydantic models: /v1/chat/completions and /v1/completions.

Types, bounds and defaults are OpenAI's (plus vLLM's extras: top_k, min_p, repetition_penalty,
ignore_eos, skip_special_tokens, stop_token_ids); request_models.py says how they are checked and
how errors read. Field order is the order errors are reported in. What depends on the served
model (the context length, --max-batch-size, the vocabulary) is checked in openai_protocol.py.
"""

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from .errors import APIError, bad_request
from .request_models import (
    Anything,
    Flag,
    Part,
    RequestModel,
    TokenId,
    TokenIds,
    Wording,
    integer,
    number,
    raw_at,
    refused,
    sequences,
    show,
    text_or,
    unsupported,
)

MAX_TOP_LOGPROBS = 20
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
UNSUPPORTED_CHAT = {
    "functions": "the legacy `functions` field is not supported; send `tools` instead",
    "logit_bias": "logit biases are not implemented",
}
UNSUPPORTED_COMPLETION = {
    "suffix": "fill-in-the-middle is not implemented",
    "logit_bias": "logit biases are not implemented",
}


# The sampling fields, in the order their errors are reported.
SAMPLING = (
    "stop",
    "n",
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "top_k",
    "min_p",
    "repetition_penalty",
    "ignore_eos",
    "skip_special_tokens",
    "stop_token_ids",
)


class TextPart(Part):
    """A content part; this model reads text only."""

    type: Literal["text"]
    text: str


class FunctionCall(Part):
    name: str
    arguments: str = Field(description="the arguments as JSON text, as OpenAI sends them")


class ToolCallIn(Part):
    """A call an earlier assistant message made (from a previous response)."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


# _content_or_calls's two rules in JSON Schema, so that /openapi.json refuses what the server refuses.
_CALLS = {
    "required": ["role", "tool_calls"],
    "properties": {"role": {"const": "assistant"}, "tool_calls": {"minItems": 1}},
}
_CONTENT_OR_CALLS = {
    "anyOf": [{"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}}, _CALLS],
    "not": {
        "required": ["role", "tool_calls"],
        "properties": {"role": {"not": {"const": "assistant"}}, "tool_calls": {"type": "array"}},
    },
}


class ChatMessage(Part):
    model_config = ConfigDict(**Part.model_config, json_schema_extra=_CONTENT_OR_CALLS)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: text_or(TextPart) | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _content_or_calls(self) -> "ChatMessage":
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise PydanticCustomError("missing_content", "content is missing")
        if self.tool_calls is not None and self.role != "assistant":
            raise PydanticCustomError("misplaced_calls", "tool_calls on a message that is not the assistant's")
        return self


class FunctionSpec(Part):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema of the arguments object")
    strict: bool | None = None


class ToolSpec(Part):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(Part):
    name: str


class NamedToolChoice(Part):
    type: Literal["function"]
    function: NamedFunction


TOOLS_SHAPE = '\'tools\' must be a list of {"type": "function", "function": {"name", "description", "parameters"}}'
Tools = Annotated[
    list[ToolSpec],
    Field(min_length=1),
    Wording(message=TOOLS_SHAPE + " objects; a name is 1-64 letters, digits, _ or -, parameters a JSON schema object"),
]
ToolChoice = Annotated[
    Literal["none", "auto", "required"] | NamedToolChoice,
    Wording(
        message='\'tool_choice\' must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}'
    ),
]


class StreamOptions(Part):
    include_usage: bool | None = None


def _messages_error(error: dict, body: dict) -> APIError:
    loc = error["loc"]
    if len(loc) == 1:
        return bad_request('\'messages\' must be a non-empty list of {"role", "content"} objects', "messages")
    where = f"messages[{loc[1]}]"
    if error["type"] == "missing_content":
        return bad_request(
            f"'{where}.content' is required (only an assistant message with 'tool_calls' may leave it out)",
            f"{where}.content",
        )
    if error["type"] == "misplaced_calls":
        return bad_request(f"'{where}.tool_calls' is allowed on assistant messages only", f"{where}.tool_calls")
    if len(loc) == 2:
        return bad_request(f"'{where}' must be an object with 'role' and 'content'", where)
    if loc[2] == "tool_calls":
        return bad_request(
            f"'{where}.tool_calls' must be a list of "
            '{"id", "type": "function", "function": {"name", "arguments": "<JSON text>"}} objects',
            f"{where}.tool_calls",
        )
    if loc[2] == "tool_call_id":
        return bad_request(f"'{where}.tool_call_id' must be a string", f"{where}.tool_call_id")
    if loc[2] == "role":
        role = raw_at(body, loc[:3])
        roles = ", ".join(CHAT_ROLES)
        return bad_request(f"'{where}.role' is {role!r}; supported roles are {roles}", f"{where}.role")
    if len(loc) > 4 and isinstance(loc[4], int):
        part = f"{where}.content[{loc[4]}]"
        return bad_request(
            f'\'{part}\' must be a text part {{"type": "text", "text": "..."}}; this model reads text only', part
        )
    content = raw_at(body, loc[:3])
    return bad_request(
        f"'{where}.content' must be a string or a list of text parts, got {type(content).__name__}",
        f"{where}.content",
    )


def _stream_options_error(error: dict, body: dict) -> APIError:
    if body.get("stream") is not True:  # said first, whatever the options hold
        return bad_request("'stream_options' is only allowed together with \"stream\": true", "stream_options")
    if len(error["loc"]) == 1:
        return bad_request("'stream_options' must be an object like {\"include_usage\": true}", "stream_options")
    value = raw_at(body, error["loc"][:2])
    return bad_request(f"'include_usage' must be true or false, got {show(value)}", "include_usage")


StreamOptionsField = Annotated[StreamOptions, Wording(explain=_stream_options_error)]


def _response_format_ok(value: Any) -> bool:
    if not isinstance(value, dict):
        return False
    kind = value.get("type")
    if kind in ("text", "json_object"):
        return set(value) <= {"type"}
    spec = value.get("json_schema")
    return (
        kind == "json_schema"
        and set(value) <= {"type", "json_schema"}
        and isinstance(spec, dict)
        and isinstance(spec.get("schema", {}), (dict, bool))
    )


# Structured output (the engine's SamplingParams.structured_output, by constrained decoding).
ResponseFormat = refused(
    "not a response format",
    _response_format_ok,
    '\'response_format\' must be {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", '
    '"json_schema": {"name": ..., "schema": {...}}}',
    "text, json_object (any JSON object) or json_schema (output that validates against the schema)",
)


def structured_output(response_format: dict | None) -> dict | None:
    """The engine's structured_output for an OpenAI response_format (None: free text)."""
    kind = (response_format or {}).get("type", "text")
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        return {"json_schema": response_format["json_schema"].get("schema", {})}
    return None


class OpenAIRequest(RequestModel):
    """What both OpenAI routes take: the model, streaming and the sampling settings."""

    model: str | None = None
    stream: Flag = False
    stream_options: StreamOptionsField = Field(None, description='with "stream": true only')
    stop: sequences() = []
    n: integer(1) = 1
    temperature: number(0.0, 2.0) = 1.0
    top_p: number(0.0, 1.0, lo_open=True) = 1.0
    presence_penalty: number(-2.0, 2.0) = 0.0
    frequency_penalty: number(-2.0, 2.0) = 0.0
    seed: integer(0, 2**63 - 1) = None
    top_k: integer(-1) = 0
    min_p: number(0.0, 1.0) = 0.0
    repetition_penalty: number(0.0, 100.0, lo_open=True) = 1.0
    ignore_eos: Flag = False
    skip_special_tokens: Flag = True
    stop_token_ids: TokenIds = []
    # vLLM's extension: each choice also gives its token ids (and which weights wrote them: admin.py)
    return_token_ids: Flag = False
    logit_bias: unsupported(UNSUPPORTED_CHAT["logit_bias"]) = None
    user: Anything = None


class ChatCompletionRequest(OpenAIRequest):
    """POST /v1/chat/completions."""

    check_order = (
        *UNSUPPORTED_CHAT,
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "messages",
        "stream",
        "stream_options",
        "logprobs",
        "top_logprobs",
        *SAMPLING,
    )

    functions: unsupported(UNSUPPORTED_CHAT["functions"]) = None
    tools: Tools = None
    tool_choice: ToolChoice = Field(None, description='default "auto" with tools, "none" without')
    parallel_tool_calls: Flag = True
    response_format: ResponseFormat = None
    messages: Annotated[
        list[ChatMessage],
        Field(min_length=1),
        Wording(required='\'messages\' is required: a list of {"role", "content"} objects', explain=_messages_error),
    ]
    logprobs: Flag = False
    top_logprobs: integer(0, MAX_TOP_LOGPROBS) = Field(None, description='with "logprobs": true only')
    max_tokens: integer(1) = Field(None, description="default: the rest of the context")
    max_completion_tokens: integer(1) = Field(None, description="wins over max_tokens")
    metadata: Anything = None
    store: Anything = None
    service_tier: Anything = None
    safety_identifier: Anything = None
    prompt_cache_key: Anything = None
    function_call: Anything = None


PromptText = Annotated[
    str | list[TokenId] | list[str | list[TokenId]],
    Field(description="a string or a list of token ids (or a one-element list of either)"),
    Wording(
        required="'prompt' is required: a string or a list of token ids",
        message="'prompt' must be a non-empty string or a non-empty list of non-negative token ids",
    ),
]


class CompletionRequest(OpenAIRequest):
    """POST /v1/completions (OpenAI's legacy completions)."""

    check_order = (
        *UNSUPPORTED_COMPLETION,
        "prompt",
        "stream",
        "logprobs",
        "echo",
        "best_of",
        "response_format",
        *SAMPLING,
        "max_tokens",
    )

    suffix: unsupported(UNSUPPORTED_COMPLETION["suffix"]) = None
    prompt: PromptText
    logprobs: integer(0, 5) = None
    echo: Flag = False
    best_of: integer(1) = Field(None, description="equal to n only")
    response_format: ResponseFormat = None
    max_tokens: integer(0) = 16  # OpenAI's legacy default; 0 only with echo (the prompt's log-probs)


# Accepted and ignored: they do not change the answer here. `user`, `metadata`, `store`,
# `service_tier`, `safety_identifier` and `prompt_cache_key` concern OpenAI's accounting and
# storage; `function_call` means something only with the legacy `functions`, which are refused.
IGNORED_CHAT = (
    "user",
    "metadata",
    "store",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
    "function_call",
)
IGNORED_COMPLETION = ("user",)
