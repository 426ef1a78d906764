"""Row validation: every malformed record is reported by file, row and field.

Each check returns the row's value in a normal form or raises ``RecordError(field, problem)``.
The data modules turn that into a ``DataError`` naming the file and row, or, with
``skip_bad_rows: true``, drop the row and count it. Nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from astrai.core.errors import AstraiError

ROLES = ("system", "user", "assistant", "tool")
SKIP_HINT = "fix the row, or set `data.skip_bad_rows: true` to skip and count such rows"


class DataError(AstraiError):
    """Training data cannot be used as given; the message names the file, row, field and the fix."""


class RecordError(AstraiError):
    """One row is malformed: ``field`` names the column, ``problem`` says what is wrong."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"field {field!r}: {problem}")
        self.field = field
        self.problem = problem


def row_error(origin: str, row: int, error: RecordError) -> DataError:
    """The user-facing error for a bad row; ``row`` counts records from 1."""
    return DataError(f"{origin}, row {row}: {error}; {SKIP_HINT}")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def require_text(value: Any, field: str, *, allow_empty: bool = False) -> str:
    if value is None:
        raise RecordError(field, "is missing")
    if not isinstance(value, str):
        raise RecordError(field, f"must be a string, got {_type_name(value)}")
    if not allow_empty and not value.strip():
        raise RecordError(field, "is empty")
    return value


def _content(value: Any, where: str) -> str:
    # Content may be a string or OpenAI-style parts [{"type": "text", "text": ...}].
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RecordError(where, f"part {j} must be {{'type': 'text', 'text': <string>}}")
            texts.append(part["text"])
        return "".join(texts)
    raise RecordError(where, f"must be a string, got {_type_name(value)}")


def _tool_calls(message: Mapping, role: str, where: str) -> list[dict] | None:
    """An assistant message's `tool_calls` (OpenAI's shape, or bare {"name", "arguments"}),
    which the chat template renders as <tool_call> blocks to train on."""
    calls = message.get("tool_calls")
    if calls is None:
        return None
    if role != "assistant" or not isinstance(calls, list):
        raise RecordError(f"{where}.tool_calls", "must be a list of calls, on assistant messages only")
    for j, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise RecordError(f"{where}.tool_calls[{j}]", 'must be {"function": {"name": ..., "arguments": ...}}')
    return calls


def require_messages(value: Any, field: str, *, need_assistant: bool = True) -> list[dict[str, Any]]:
    """A chat conversation: a non-empty list of {"role", "content"} with known roles."""
    if value is None:
        raise RecordError(field, "is missing")
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise RecordError(field, f"must be a list of {{'role', 'content'}} messages, got {_type_name(value)}")
    if len(value) == 0:
        raise RecordError(field, "conversation is empty")
    messages = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, Mapping):
            raise RecordError(where, f"must be a {{'role', 'content'}} dict, got {_type_name(message)}")
        role = message.get("role")
        if role not in ROLES:
            raise RecordError(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        calls = _tool_calls(message, role, where)
        if message.get("content") is None and not calls:
            raise RecordError(f"{where}.content", "is missing")
        content = "" if message.get("content") is None else _content(message["content"], f"{where}.content")
        messages.append({"role": role, "content": content, **({"tool_calls": calls} if calls else {})})
    if need_assistant:
        replies = [m for m in messages if m["role"] == "assistant"]
        if not replies:
            raise RecordError(field, "has no assistant message (nothing to train on)")
        if not any(m["content"].strip() or m.get("tool_calls") for m in replies):
            raise RecordError(field, "every assistant message is empty")
    return messages


def _string_or_list(value: Any, field: str) -> None:
    if value is not None and not isinstance(value, (str, list, tuple)):
        raise RecordError(
            field, f"must be a string or a list of {{'role', 'content'}} messages, got {_type_name(value)}"
        )


def prompt_messages(value: Any, field: str = "prompt", system_prompt: str | None = None) -> list[dict[str, str]]:
    """A prompt as a message list: a string becomes one user turn (after an optional system turn)."""
    _string_or_list(value, field)
    if isinstance(value, str) or value is None:
        text = require_text(value, field)
        system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return [*system, {"role": "user", "content": text}]
    messages = require_messages(value, field, need_assistant=False)
    if messages[-1]["role"] == "assistant":
        raise RecordError(field, "must end with a user (or system) turn, not an assistant reply")
    return messages


def reply_messages(value: Any, field: str, prompt: list[dict[str, str]]) -> list[dict[str, str]]:
    """A reply as a message list: a string is one assistant turn. A full conversation that
    starts with the prompt (a common layout of preference data) is cut to what follows it."""
    _string_or_list(value, field)
    if isinstance(value, str) or value is None:
        return [{"role": "assistant", "content": require_text(value, field)}]
    messages = require_messages(value, field)
    if messages[: len(prompt)] == prompt:
        messages = messages[len(prompt) :]
    if not messages or messages[0]["role"] != "assistant":
        raise RecordError(field, "must be a reply: a string, or messages starting with an assistant turn")
    return messages


def optional_float(value: Any, field: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordError(field, f"must be a number, got {_type_name(value)}")
    return float(value)
