"""Anthropic Messages protocol: /v1/messages requests in, message JSON and stream events out.

A final assistant message is a prefill: the reply continues it, as in Anthropic's API.
Stop reasons map from the engine's: length -> max_tokens, a matched stop string ->
stop_sequence, a reply with tool calls -> tool_use, anything else that stopped (EOS / end of
turn) -> end_turn. The request body is a
pydantic model (anthropic_models.py); here it meets the served model's chat template and context.
"""

from __future__ import annotations

import uuid
from typing import Any

from . import request_fields as fields
from .anthropic_models import IGNORED, MessagesRequest  # noqa: F401 - IGNORED: importable from here
from .errors import APIError, bad_request
from .generation import Accumulator, Generation, ModelInfo, checked_params, fit_max_tokens
from .openai_protocol import check_model
from .request_models import validated
from .tool_use import ReplyCalls, ToolRequest, anthropic_tool_use, chat_prompt_ids

# Every field /v1/messages takes (its model's); in strict mode (the default) any other is refused,
# as Anthropic does (OpenAI's `n` and `seed` included).
MESSAGE_FIELDS = MessagesRequest.accepted()


def unknown_field(name: str, accepted: frozenset[str]) -> APIError:
    """Anthropic's own wording, plus the likely fix."""
    return fields.unknown_field_error(
        f"{fields.clip(name)}: Extra inputs are not permitted{fields.did_you_mean(name, accepted)}", name
    )


def _text(content: str | list | None) -> str:
    if content is None:
        return ""
    return content if isinstance(content, str) else "".join(b.text for b in content if b.type == "text")


def _chat_messages(m) -> list[dict[str, Any]]:
    """One Anthropic message as chat-template messages: an assistant's tool_use blocks become its
    tool_calls; a user's tool_result blocks become tool messages ahead of its text."""
    if isinstance(m.content, str):
        return [{"role": m.role, "content": m.content}]
    if m.role == "assistant":
        calls = [
            {"id": b.id, "type": "function", "function": {"name": b.name, "arguments": b.input}}
            for b in m.content
            if b.type == "tool_use"
        ]
        return [{"role": "assistant", "content": _text(m.content), **({"tool_calls": calls} if calls else {})}]
    out = [
        {"role": "tool", "tool_call_id": b.tool_use_id, "content": ("error: " if b.is_error else "") + _text(b.content)}
        for b in m.content
        if b.type == "tool_result"
    ]
    if any(b.type == "tool_use" for b in m.content):
        raise bad_request("messages: tool_use blocks belong in assistant messages", "messages")
    text = [b for b in m.content if b.type == "text"]
    return out + ([{"role": "user", "content": _text(text)}] if text or not out else [])


def _tools(req: MessagesRequest) -> ToolRequest:
    functions = [
        {"name": t.name, **({"description": t.description} if t.description else {}), "parameters": t.input_schema}
        for t in req.tools or []
    ]
    choice = req.tool_choice
    kind = choice.type if choice is not None else ("auto" if functions else "none")
    if kind == "tool" and not choice.name:
        raise bad_request('tool_choice: {"type": "tool"} needs the tool\'s "name"', "tool_choice")
    named = {"auto": "auto", "any": "required", "none": "none"}.get(kind) or choice.name
    parallel = not (choice is not None and choice.disable_parallel_tool_use)
    tools = ToolRequest(functions, named, parallel)
    tools.check("tool_choice")
    return tools


def _prompt_ids(req: MessagesRequest, info: ModelInfo, tools: ToolRequest) -> list[int]:
    messages = [message for m in req.messages for message in _chat_messages(m)]
    if req.system is not None:
        messages.insert(0, {"role": "system", "content": _text(req.system)})
    prefill = ""
    if messages[-1]["role"] == "assistant":
        if messages[-1].get("tool_calls"):
            raise bad_request(
                "messages: the last message holds tool_use blocks; send their tool_result blocks in a user message",
                "messages",
            )
        prefill = messages.pop()["content"]
    return chat_prompt_ids(info, messages, tools, "messages", prefill, said="messages: ")


def parse_messages(body: dict, info: ModelInfo) -> tuple[Generation, dict[str, Any]]:
    req = validated(MessagesRequest, body, unknown_field, lambda: check_model(body, info))
    if isinstance(req.thinking, dict) and req.thinking.get("type") == "enabled":
        raise bad_request("thinking: extended thinking is not supported by this model", "thinking")
    stop = [req.stop_sequences] if isinstance(req.stop_sequences, str) else list(req.stop_sequences)
    tools = _tools(req)
    params = {
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "stop": stop or None,
        "ignore_eos": req.ignore_eos,  # vLLM's extra, as on the OpenAI routes
    }
    if tools.forced:  # the reply is the call: constrained decoding enforces it
        params["structured_output"] = tools.structured_output()
    prompt_ids = _prompt_ids(req, info, tools)
    params["max_tokens"] = fit_max_tokens(len(prompt_ids), req.max_tokens, info, "max_tokens", "messages")
    options = {"stream": req.stream, "stop": stop, "tools": tools.parallel if tools.active else None}
    return Generation(prompt_ids, checked_params(params), req.stream), options


def stop_fields(finish_reason: str | None, stop_reason: Any, stop: list[str]) -> dict[str, Any]:
    if finish_reason == "length":
        return {"stop_reason": "max_tokens", "stop_sequence": None}
    if isinstance(stop_reason, str) and stop_reason in stop:
        return {"stop_reason": "stop_sequence", "stop_sequence": stop_reason}
    return {"stop_reason": "end_turn", "stop_sequence": None}


def new_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def message_response(message_id: str, info: ModelInfo, acc: Accumulator, options: dict) -> dict[str, Any]:
    choice = acc.choices[0]
    content: list[dict[str, Any]] = [{"type": "text", "text": choice.text}]
    stop = stop_fields(choice.finish_reason, choice.stop_reason, options["stop"])
    if options.get("tools") is not None:
        text, calls = ReplyCalls(parallel=options["tools"]).feed(choice.text, last=True)
        content = ([{"type": "text", "text": text}] if text or not calls else []) + [
            anthropic_tool_use(c) for c in calls
        ]
        if calls and stop["stop_reason"] == "end_turn":
            stop = {"stop_reason": "tool_use", "stop_sequence": None}
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": info.name,
        "content": content,
        **stop,
        "usage": {"input_tokens": acc.prompt_tokens, "output_tokens": acc.completion_tokens},
        "weights_version": acc.weights_version,  # the served weights (admin.py)
    }


def _event(kind: str, **data: Any) -> tuple[str, dict]:
    return kind, {"type": kind, **data}


class MessageStream:
    """Anthropic's event sequence: message_start, content_block_start, ping, content_block_delta*,
    content_block_stop, message_delta (stop_reason, usage), message_stop. Items are
    (event name, data) pairs; server.py writes them as SSE. With tools, each call the reply
    makes is a tool_use block of its own, its input sent whole as one input_json_delta once the
    call is complete; text after a call opens a new text block."""

    def __init__(self, message_id: str, info: ModelInfo, prompt_tokens: int, options: dict) -> None:
        self.id, self.info, self.options = message_id, info, options
        self.prompt_tokens = prompt_tokens
        self.acc = Accumulator(1)
        self.reply = ReplyCalls(parallel=options["tools"]) if options.get("tools") is not None else None
        self.block, self.text_open = 0, True  # the index of the block being written; a text block?

    def start(self) -> list[tuple[str, dict]]:
        message = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.info.name,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self.prompt_tokens, "output_tokens": 0},
        }
        return [
            _event("message_start", message=message),
            _event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
            ("ping", {"type": "ping"}),
        ]

    def _text(self, text: str) -> list[tuple[str, dict]]:
        out = []
        if not self.text_open:
            self.block, self.text_open = self.block + 1, True
            out.append(_event("content_block_start", index=self.block, content_block={"type": "text", "text": ""}))
        out.append(_event("content_block_delta", index=self.block, delta={"type": "text_delta", "text": text}))
        return out

    def _call(self, call) -> list[tuple[str, dict]]:
        out = [_event("content_block_stop", index=self.block)] if self.text_open else []
        self.block, self.text_open = self.block + 1, False  # block 0, text, is always started
        block = {**anthropic_tool_use(call), "input": {}}
        out.append(_event("content_block_start", index=self.block, content_block=block))
        delta = {"type": "input_json_delta", "partial_json": call.arguments_json}
        out.append(_event("content_block_delta", index=self.block, delta=delta))
        out.append(_event("content_block_stop", index=self.block))
        return out

    def events(self, events: list[dict]) -> list[tuple[str, dict]]:
        out = []
        for event in events:
            self.acc.add(event)
            if self.reply is None:
                if event["text"]:
                    out += self._text(event["text"])
                continue
            text, calls = self.reply.feed(event["text"], last=event["finish_reason"] is not None)
            if text:
                out += self._text(text)
            for call in calls:
                out += self._call(call)
        return out

    def end(self) -> list[tuple[str, dict]]:
        choice = self.acc.choices[0]
        delta = stop_fields(choice.finish_reason, choice.stop_reason, self.options["stop"])
        if self.reply is not None and self.reply.calls and delta["stop_reason"] == "end_turn":
            delta = {"stop_reason": "tool_use", "stop_sequence": None}
        closing = [_event("content_block_stop", index=self.block)] if self.text_open else []
        return [
            *closing,
            _event(
                "message_delta",
                delta=delta,
                usage={"output_tokens": self.acc.completion_tokens},
                weights_version=self.acc.weights_version,  # the served weights (admin.py), as in whole replies
            ),
            _event("message_stop"),
        ]
