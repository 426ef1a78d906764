"""Anthropic Messages protocol: /v1/messages requests in, message JSON and stream events out.

A final assistant message is a prefill: the reply continues it, as in Anthropic's API.
Stop reasons map from the engine's: length -> max_tokens, a matched stop string ->
stop_sequence, anything else that stopped (EOS / end of turn) -> end_turn.
"""

from __future__ import annotations

import uuid
from typing import Any

from jinja2 import TemplateError

from . import request_fields as fields
from .errors import APIError, bad_request
from .generation import Accumulator, Generation, ModelInfo, checked_params, encode, fit_max_tokens
from .openai_protocol import check_model

ROLES = ("user", "assistant")
_UNSUPPORTED = {
    "tools": "tool use is not implemented; describe the tools in the system prompt instead",
    "tool_choice": "tool use is not implemented",
}
# Every field /v1/messages takes; in strict mode (the default) any other is refused, as Anthropic
# does (OpenAI's `n` and `seed` included). `metadata` (a user id for abuse tracking) and
# `service_tier` are accepted and ignored: they do not change the answer.
IGNORED = ("metadata", "service_tier")
MESSAGE_FIELDS = frozenset(
    {
        "model",
        "messages",
        "system",
        "max_tokens",
        "stop_sequences",
        "temperature",
        "top_p",
        "top_k",
        "stream",
        "thinking",
        "ignore_eos",
        *_UNSUPPORTED,
        *IGNORED,
    }
)


def unknown_field(name: str, accepted: frozenset[str]) -> APIError:
    """Anthropic's own wording, plus the likely fix."""
    return fields.unknown_field_error(
        f"{fields.clip(name)}: Extra inputs are not permitted{fields.did_you_mean(name, accepted)}", name
    )


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, block in enumerate(content):
            if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
                kind = block.get("type") if isinstance(block, dict) else type(block).__name__
                raise bad_request(
                    f"{where}.{j}: content block of type {kind!r} is not supported; "
                    'send {"type": "text", "text": "..."} blocks (this model reads text only)'
                )
            texts.append(block["text"])
        return "".join(texts)
    raise bad_request(f"{where}: must be a string or a list of text blocks, got {type(content).__name__}")


def _messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if messages is None:
        raise bad_request('messages: Field required; send a list of {"role": "user", "content": "..."}')
    if not isinstance(messages, list) or not messages:
        raise bad_request('messages: must be a non-empty list of {"role", "content"} objects')
    out = []
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(message, dict):
            raise bad_request(f"{where}: must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            hint = " (put the system prompt in the top-level 'system' field)" if role == "system" else ""
            raise bad_request(f"{where}.role: {role!r} is not a valid role; use 'user' or 'assistant'{hint}")
        out.append({"role": role, "content": _text(message.get("content"), f"{where}.content")})
    return out


def _prompt_ids(body: dict, info: ModelInfo) -> list[int]:
    messages = _messages(body)
    system = body.get("system")
    if system is not None:
        messages.insert(0, {"role": "system", "content": _text(system, "system")})
    prefill = messages.pop()["content"] if messages[-1]["role"] == "assistant" else ""
    try:
        text = info.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except (ValueError, TemplateError) as e:
        raise bad_request(f"messages: cannot apply the chat template: {e}") from None
    return encode(info.tokenizer, text + prefill)


def parse_messages(body: dict, info: ModelInfo) -> tuple[Generation, dict[str, Any]]:
    check_model(body, info)
    fields.reject_unsupported(body, _UNSUPPORTED)
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") == "enabled":
        raise bad_request("thinking: extended thinking is not supported by this model")
    if body.get("max_tokens") is None:
        raise bad_request("max_tokens: Field required; set the most tokens to generate, e.g. 1024")
    max_tokens = fields.integer(body, "max_tokens", None, 1)
    stop = fields.string_list(body, "stop_sequences")
    params = {
        "temperature": fields.number(body, "temperature", 1.0, 0.0, 1.0),
        "top_p": fields.number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        "top_k": fields.integer(body, "top_k", 0, 0),
        "stop": stop or None,
        "ignore_eos": fields.boolean(body, "ignore_eos", False),  # vLLM's extra, as on the OpenAI routes
    }
    prompt_ids = _prompt_ids(body, info)
    params["max_tokens"] = fit_max_tokens(len(prompt_ids), max_tokens, info, "max_tokens", "messages")
    stream = fields.boolean(body, "stream", False)
    return Generation(prompt_ids, checked_params(params), stream), {"stream": stream, "stop": stop}


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
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": info.name,
        "content": [{"type": "text", "text": choice.text}],
        **stop_fields(choice.finish_reason, choice.stop_reason, options["stop"]),
        "usage": {"input_tokens": acc.prompt_tokens, "output_tokens": acc.completion_tokens},
    }


class MessageStream:
    """Anthropic's event sequence: message_start, content_block_start, ping, content_block_delta*,
    content_block_stop, message_delta (stop_reason, usage), message_stop. Items are
    (event name, data) pairs; server.py writes them as SSE."""

    def __init__(self, message_id: str, info: ModelInfo, prompt_tokens: int, options: dict) -> None:
        self.id, self.info, self.options = message_id, info, options
        self.prompt_tokens = prompt_tokens
        self.acc = Accumulator(1)

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
            ("message_start", {"type": "message_start", "message": message}),
            (
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            ),
            ("ping", {"type": "ping"}),
        ]

    def events(self, events: list[dict]) -> list[tuple[str, dict]]:
        out = []
        for event in events:
            self.acc.add(event)
            if event["text"]:
                out.append(
                    (
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": 0,
                            "delta": {"type": "text_delta", "text": event["text"]},
                        },
                    )
                )
        return out

    def end(self) -> list[tuple[str, dict]]:
        choice = self.acc.choices[0]
        delta = stop_fields(choice.finish_reason, choice.stop_reason, self.options["stop"])
        return [
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            (
                "message_delta",
                {"type": "message_delta", "delta": delta, "usage": {"output_tokens": self.acc.completion_tokens}},
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
