"""Tool calls in a model's text: the `<tool_call>` convention, reading calls out of a reply (whole
or streamed), and the grammar that forces a reply to be calls.

Why here, in core: the convention belongs to the chat template (chat_template.py renders calls
and results this way, as Qwen's and Hermes' templates do), and more than the server needs it:
offline generation and RL rollouts read calls the same way.

A call is `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`. A reply's content is
its text outside the calls, without the whitespace next to them; a block whose JSON does not
parse as a call stays in the content as text, as vLLM's Hermes parser leaves it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import AstraiError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
# The separators json.dumps and the template's tojson write: forced calls look like rendered ones.
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: the function's name and its arguments (a JSON object)."""

    name: str
    arguments: dict[str, Any]

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


def read_call(body: str) -> ToolCall | None:
    """The call in the text between the tags, or None if it is not one."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string, as OpenAI sends them
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    return ToolCall(value["name"], arguments) if isinstance(arguments, dict) else None


class ToolCallParser:
    """Splits streamed text into content and calls. `feed(delta)` and `finish()` return a list of
    str (content to show now) and ToolCall items, in order. Text that may be the start of a
    tag, and trailing whitespace, is held until the next delta shows what it is."""

    def __init__(self) -> None:
        self._pending = ""
        self._in_call = False
        self._after_call = False
        self.calls: list[ToolCall] = []

    def feed(self, delta: str) -> list[str | ToolCall]:
        self._pending += delta
        out: list[str | ToolCall] = []
        while self._step(out):
            pass
        return out

    def _step(self, out: list) -> bool:
        if self._in_call:
            end = self._pending.find(CLOSE)
            if end < 0:
                return False
            body, self._pending = self._pending[:end], self._pending[end + len(CLOSE) :]
            call = read_call(body)
            if call is None:
                out.append(OPEN + body + CLOSE)
            else:
                self.calls.append(call)
                out.append(call)
            self._in_call, self._after_call = False, call is not None
            return True
        if self._after_call:
            self._pending = self._pending.lstrip()
            if not self._pending:
                return False
            self._after_call = False
        start = self._pending.find(OPEN)
        if start >= 0:
            if text := self._pending[:start].rstrip():
                out.append(text)
            self._pending, self._in_call = self._pending[start + len(OPEN) :], True
            return True
        keep = _held_back(self._pending)
        if text := self._pending[: len(self._pending) - keep]:
            out.append(text)
        self._pending = self._pending[len(self._pending) - keep :]
        return False

    def finish(self) -> list[str | ToolCall]:
        """The rest at the end of the reply: an unclosed call is content, as written."""
        rest = (OPEN + self._pending) if self._in_call else self._pending.rstrip()
        self._pending, self._in_call = "", False
        return [rest] if rest else []


def _held_back(text: str) -> int:
    """How many characters at the end of `text` to hold: a possible start of OPEN, and the
    whitespace before it (dropped if a call follows)."""
    keep = 0
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-n:]):
            keep = n
            break
    body = text[: len(text) - keep]
    return keep + len(body) - len(body.rstrip())


def split_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """A whole reply's content (None if empty) and calls; the same split as streaming gives."""
    parser = ToolCallParser()
    parts = parser.feed(text) + parser.finish()
    content = "".join(p for p in parts if isinstance(p, str))
    return (content or None), parser.calls


def function_specs(tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI tool entries ({"type": "function", "function": {...}}) or bare function specs
    ({"name", "description", "parameters"}) as bare specs."""
    specs = []
    for i, tool in enumerate(tools):
        spec = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
            raise AstraiError(f"tools[{i}] must be a function with a 'name'")
        specs.append(dict(spec))
    return specs


def tool_call_grammar(functions: Sequence[Mapping[str, Any]], parallel: bool = True) -> dict[str, str]:
    """A structured_output setting (SamplingParams) whose replies are one call (`parallel`:
    one or more) of the given functions, arguments valid against each one's parameters."""
    if not functions:
        raise AstraiError("tool_call_grammar needs at least one function")
    one_of = [
        {
            "type": "object",
            "properties": {
                "name": {"const": f["name"]},
                "arguments": f.get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    schema = {"anyOf": one_of, "x-guidance": _JSON_STYLE}
    repeat = ' ("\\n" call)*' if parallel else ""
    lark = (
        f"start: call{repeat}\n"
        f'call: "{OPEN}\\n" body "\\n{CLOSE}"\n'
        f"body: %json {json.dumps(schema, ensure_ascii=False)}\n"
    )
    return {"lark": lark}
