"""Anthropic Messages protocol: /v1/messages requests in, message JSON and stream events out.

A final assistant message is a prefill: the reply continues it, as in Anthropic's API.
Stop reasons map from the engine's: length -> max_tokens, a matched stop string ->
stop_sequence, anything else that stopped (EOS / end of turn) -> end_turn. The request body is a
pydantic model (anthropic_models.py); here it meets the served model's chat template and context.
"""

from __future__ import annotations

import uuid
from typing import Any

from jinja2 import TemplateError

from . import request_fields as fields
from .anthropic_models import IGNORED, MessagesRequest  # noqa: F401 - IGNORED: importable from here
from .errors import APIError, bad_request
from .generation import Accumulator, Generation, ModelInfo, checked_params, encode, fit_max_tokens
from .openai_protocol import check_model
from .request_models import validated

# Every field /v1/messages takes (its model's); in strict mode (the default) any other is refused,
# as Anthropic does (OpenAI's `n` and `seed` included).
MESSAGE_FIELDS = MessagesRequest.accepted()


def unknown_field(name: str, accepted: frozenset[str]) -> APIError:
    """Anthropic's own wording, plus the likely fix."""
    return fields.unknown_field_error(
        f"{fields.clip(name)}: Extra inputs are not permitted{fields.did_you_mean(name, accepted)}", name
    )


def _text(content: str | list) -> str:
    return content if isinstance(content, str) else "".join(block.text for block in content)


def _prompt_ids(req: MessagesRequest, info: ModelInfo) -> list[int]:
    messages = [{"role": m.role, "content": _text(m.content)} for m in req.messages]
    if req.system is not None:
        messages.insert(0, {"role": "system", "content": _text(req.system)})
    prefill = messages.pop()["content"] if messages[-1]["role"] == "assistant" else ""
    try:
        text = info.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except (ValueError, TemplateError) as e:
        raise bad_request(f"messages: cannot apply the chat template: {e}", "messages") from None
    return encode(info.tokenizer, text + prefill)


def parse_messages(body: dict, info: ModelInfo) -> tuple[Generation, dict[str, Any]]:
    req = validated(MessagesRequest, body, unknown_field, lambda: check_model(body, info))
    if isinstance(req.thinking, dict) and req.thinking.get("type") == "enabled":
        raise bad_request("thinking: extended thinking is not supported by this model", "thinking")
    stop = [req.stop_sequences] if isinstance(req.stop_sequences, str) else list(req.stop_sequences)
    params = {
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "stop": stop or None,
        "ignore_eos": req.ignore_eos,  # vLLM's extra, as on the OpenAI routes
    }
    prompt_ids = _prompt_ids(req, info)
    params["max_tokens"] = fit_max_tokens(len(prompt_ids), req.max_tokens, info, "max_tokens", "messages")
    return Generation(prompt_ids, checked_params(params), req.stream), {"stream": req.stream, "stop": stop}


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
        "weights_version": acc.weights_version,  # the served weights (admin.py)
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
