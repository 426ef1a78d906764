"""Tool use for both protocols: what a request's tools and tool choice mean for the prompt and the
sampler, and the calls read out of each reply.

Why one module: OpenAI's `tools`/`tool_choice` and Anthropic's `tools`/`tool_choice` say the
same things in two shapes. Each protocol module turns its shape into a `ToolRequest`; from
there the prompt (the chat template renders the functions), the constraint (a forced choice is
enforced by constrained decoding: astrai.core.tool_calls' grammar, not by hoping) and the reply
(`ReplyCalls` splits the text into content and calls, streamed or whole) are shared.
"""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass, field
from typing import Any

from jinja2 import TemplateError

from astrai.core.chat_template import render_chat_template
from astrai.core.tool_calls import ToolCall, ToolCallParser, tool_call_grammar

from .errors import bad_request
from .generation import ModelInfo, encode


@dataclass(frozen=True)
class ToolRequest:
    """A request's tools as the engine needs them.

    functions: bare function specs {"name", "description", "parameters"} as the template shows them.
    choice: "none" (tools neither shown nor read), "auto" (the model decides), "required" (at
        least one call), or a function's name (exactly that call).
    parallel: whether a reply may hold more than one call.
    """

    functions: list[dict[str, Any]] = field(default_factory=list)
    choice: str = "none"
    parallel: bool = True

    @property
    def active(self) -> bool:
        return bool(self.functions) and self.choice != "none"

    @property
    def forced(self) -> bool:
        return self.active and self.choice != "auto"

    def structured_output(self) -> dict | None:
        """The constraint a forced choice puts on the sampler (None: free text)."""
        if not self.forced:
            return None
        if self.choice == "required":
            return tool_call_grammar(self.functions, parallel=self.parallel)
        named = [f for f in self.functions if f["name"] == self.choice]
        return tool_call_grammar(named, parallel=False)

    def check(self, choice_field: str) -> None:
        """A forced choice needs tools, and a named one a declared function."""
        if self.choice in ("none", "auto"):
            return
        if not self.functions:
            raise bad_request(f"'{choice_field}' forces a tool call, but the request declares no tools", choice_field)
        if self.choice != "required" and self.choice not in {f["name"] for f in self.functions}:
            names = ", ".join(f["name"] for f in self.functions)
            raise bad_request(
                f"'{choice_field}' names {self.choice!r}, which is not among the request's tools ({names})",
                choice_field,
            )


def chat_prompt_ids(
    info: ModelInfo, messages: list[dict], tools: ToolRequest, where: str, prefill: str = "", said: str = ""
) -> list[int]:
    """The prompt's token ids: the conversation (and the tools, when active) through the chat
    template. A template that ignores tools cannot prompt for calls: refused, naming the field.
    `said` starts a template error's message (each protocol's wording)."""
    variables = {"tools": [{"type": "function", "function": f} for f in tools.functions]} if tools.active else {}
    if variables and not renders_tools(info.tokenizer.chat_template or ""):
        raise bad_request(
            "this model's chat template does not render tools, so the model cannot be asked to call "
            "them; serve a tokenizer whose template shows `tools` (astrai's default template does)",
            "tools",
        )
    return encode(info.tokenizer, _render(info, messages, where, said, **variables) + prefill)


_PROBE = [{"role": "user", "content": "hi"}]
_PROBE_TOOLS = [{"type": "function", "function": {"name": "probe_tool", "parameters": {"type": "object"}}}]


@functools.lru_cache(maxsize=8)
def renders_tools(template: str) -> bool:
    """Whether a chat template shows `tools` at all: a probe conversation rendered with and
    without one tool differs. Once per template, not per request."""
    try:
        plain = render_chat_template(template, _PROBE, add_generation_prompt=True)
        return plain != render_chat_template(template, _PROBE, add_generation_prompt=True, tools=_PROBE_TOOLS)
    except (ValueError, TemplateError):
        return True  # a template that fails on the probe fails on the request too, with its own message


def _render(info: ModelInfo, messages: list[dict], where: str, said: str, **variables: Any) -> str:
    try:
        return info.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **variables)
    except (ValueError, TemplateError) as e:
        raise bad_request(f"{said}cannot apply the chat template: {e}", where) from None


class ReplyCalls:
    """One reply's calls, read as its text arrives. `feed(text, last)` gives the content to show
    now and the calls completed; with `parallel` off, calls after the first are dropped."""

    def __init__(self, parallel: bool = True) -> None:
        self.parallel = parallel
        self.parser = ToolCallParser()
        self.calls: list[ToolCall] = []

    def feed(self, text: str, last: bool = False) -> tuple[str, list[ToolCall]]:
        parts = self.parser.feed(text) + (self.parser.finish() if last else [])
        new = []
        for part in parts:
            if isinstance(part, ToolCall) and (self.parallel or not self.calls):
                self.calls.append(part)
                new.append(part)
        return "".join(p for p in parts if isinstance(p, str)), new


def call_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def openai_tool_call(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    """A call as OpenAI's `tool_calls` entry (with `index` in a stream delta)."""
    entry = {
        "id": call_id("call_"),
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments_json},
    }
    return entry if index is None else {"index": index, **entry}


def anthropic_tool_use(call: ToolCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": call_id("toolu_"), "name": call.name, "input": call.arguments}
