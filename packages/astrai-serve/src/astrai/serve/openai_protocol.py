"""OpenAI protocol: /v1/chat/completions and /v1/completions requests in, response JSON and
stream chunks out. Pure functions and small classes; no HTTP here (see server.py).

Beyond OpenAI's fields we take vLLM's extras: top_k, min_p, repetition_penalty, ignore_eos,
stop_token_ids, skip_special_tokens. Fields that would change the answer but that we cannot
honour (logit_bias, suffix, the legacy functions) are refused rather than ignored. Tools go
through tool_use.py (shared with the Anthropic route). The request bodies
are pydantic models (openai_models.py); here they meet the served model: its chat template,
context length, batch size and vocabulary.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from . import request_fields as fields
from .errors import APIError, bad_request
from .generation import (
    Accumulator,
    Choice,
    Generation,
    ModelInfo,
    check_token_ids,
    checked_params,
    encode,
    fit_max_tokens,
)
from .openai_models import (  # noqa: F401 - IGNORED_*, MAX_TOP_LOGPROBS: importable from here as before
    CHAT_ROLES,
    IGNORED_CHAT,
    IGNORED_COMPLETION,
    MAX_TOP_LOGPROBS,
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIRequest,
    structured_output,
)
from .request_models import validated
from .tool_use import ReplyCalls, ToolRequest, chat_prompt_ids, openai_tool_call

# Every field each route takes (its model's); in strict mode (the default) any other is refused, as OpenAI does.
CHAT_FIELDS = ChatCompletionRequest.accepted()
COMPLETION_FIELDS = CompletionRequest.accepted()


def unknown_field(name: str, accepted: frozenset[str]) -> APIError:
    """OpenAI's own wording, plus the likely fix."""
    return fields.unknown_field_error(
        f"Unrecognized request argument supplied: {fields.clip(name)}{fields.did_you_mean(name, accepted)}", name
    )


def check_model(body: dict, info: ModelInfo) -> None:
    model = body.get("model")
    if model is not None and model != info.name:
        raise APIError(
            404,
            f"model {model!r} does not exist; this server serves {info.name!r} (see GET /v1/models)",
            param="model",
            type="invalid_request_error",
            code="model_not_found",
        )


def _sampling(req: OpenAIRequest, info: ModelInfo) -> dict[str, Any]:
    """SamplingParams fields shared by both OpenAI endpoints."""
    if req.n > info.max_batch_size:  # the samples of one request decode side by side
        raise bad_request(
            f"'n' is {req.n} but this server decodes at most {info.max_batch_size} sequences at once "
            "(--max-batch-size); ask for fewer samples",
            "n",
        )
    return {
        "temperature": req.temperature,
        "top_p": req.top_p,
        "n": req.n,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "seed": req.seed,
        "stop": _stop_list(req.stop) or None,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "repetition_penalty": req.repetition_penalty,
        "ignore_eos": req.ignore_eos,
        "skip_special_tokens": req.skip_special_tokens,
        "stop_token_ids": req.stop_token_ids or None,
    }


def _stop_list(stop: str | list[str]) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop)


def _include_usage(req: OpenAIRequest) -> bool:
    if req.stream_options is None:
        return False
    if not req.stream:
        raise bad_request("'stream_options' is only allowed together with \"stream\": true", "stream_options")
    return bool(req.stream_options.include_usage)


def _text_content(content: str | list) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)


def _logprobs_count(req: ChatCompletionRequest) -> int | None:
    """Chat: `logprobs` (bool) + `top_logprobs` (0..20) -> SamplingParams.logprobs."""
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("'top_logprobs' needs \"logprobs\": true", "top_logprobs")
    return (req.top_logprobs or 0) if req.logprobs else None


def _chat_message(m) -> dict[str, Any]:
    message = {"role": CHAT_ROLES[m.role], "content": None if m.content is None else _text_content(m.content)}
    if m.tool_calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in m.tool_calls
        ]
    if m.tool_call_id is not None:
        message["tool_call_id"] = m.tool_call_id
    return message


def _tools(req: ChatCompletionRequest) -> ToolRequest:
    """OpenAI's tools and tool_choice: the choice defaults to "auto" with tools, "none" without."""
    functions = [t.function.model_dump(exclude_none=True) for t in req.tools or []]
    choice = req.tool_choice or ("auto" if functions else "none")
    tools = ToolRequest(functions, choice if isinstance(choice, str) else choice.function.name, req.parallel_tool_calls)
    tools.check("tool_choice")
    if tools.forced and structured_output(req.response_format) is not None:
        raise bad_request(
            "'response_format' cannot be combined with a forced 'tool_choice' (the reply is the tool call)",
            "response_format",
        )
    return tools


def parse_chat(body: dict, info: ModelInfo) -> tuple[Generation, dict[str, Any]]:
    """Validate a chat completion request; returns the generation and the response options."""
    req = validated(ChatCompletionRequest, body, unknown_field, lambda: check_model(body, info))
    tools = _tools(req)
    messages = [_chat_message(m) for m in req.messages]
    options = {"stream": req.stream, "include_usage": _include_usage(req), "logprobs": _logprobs_count(req)}
    options["tools"] = tools.parallel if tools.active else None  # None: replies are text only
    if req.return_token_ids:
        options["return_token_ids"] = True
    params = _sampling(req, info)
    prompt_ids = chat_prompt_ids(info, messages, tools, "messages")
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    params["max_tokens"] = fit_max_tokens(len(prompt_ids), getattr(req, name), info, name, "messages")
    params["logprobs"] = options["logprobs"]
    params["structured_output"] = tools.structured_output() or structured_output(req.response_format)
    check_token_ids(params["stop_token_ids"] or [], info.tokenizer.vocab_size, "stop_token_ids")
    return Generation(prompt_ids, checked_params(params), req.stream), options


def _completion_prompt(prompt: str | list, info: ModelInfo) -> tuple[list[int], str]:
    """Legacy `prompt`: a string or a list of token ids (or a one-element list of either)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return encode(info.tokenizer, prompt, add_special_tokens=True), prompt
    if prompt and all(isinstance(t, int) for t in prompt):
        check_token_ids(prompt, info.tokenizer.vocab_size, "prompt")
        return prompt, info.tokenizer.decode(prompt)
    if len(prompt) > 1:
        raise bad_request(
            f"'prompt' holds {len(prompt)} prompts; send one prompt per request "
            "(requests are batched by the server anyway)",
            "prompt",
        )
    raise bad_request("'prompt' must be a non-empty string or a non-empty list of non-negative token ids", "prompt")


def parse_completion(body: dict, info: ModelInfo) -> tuple[Generation, dict[str, Any]]:
    req = validated(CompletionRequest, body, unknown_field, lambda: check_model(body, info))
    prompt_ids, prompt_text = _completion_prompt(req.prompt, info)
    if req.echo and req.logprobs is not None and req.stream:
        raise bad_request("'echo' with 'logprobs' (prompt log-probs) is supported without 'stream' only", "echo")
    if req.max_tokens == 0 and not req.echo:
        raise bad_request("'max_tokens' must be at least 1, got 0 (0 only with 'echo': the prompt alone)", "max_tokens")
    params = _sampling(req, info)
    if req.best_of is not None and req.best_of != params["n"]:
        raise bad_request("'best_of' different from 'n' is not supported", "best_of")
    # 0 with echo: the prompt (and its log-probs) only; the engine still samples one token,
    # which the response leaves out.
    params["max_tokens"] = fit_max_tokens(len(prompt_ids), max(req.max_tokens, 1), info, "max_tokens", "prompt")
    params["logprobs"] = req.logprobs
    params["structured_output"] = structured_output(req.response_format)
    params["prompt_logprobs"] = req.logprobs if req.echo else None
    check_token_ids(params["stop_token_ids"] or [], info.tokenizer.vocab_size, "stop_token_ids")
    options = {
        "stream": req.stream,
        "include_usage": _include_usage(req),
        "logprobs": req.logprobs,
        "echo": prompt_text if req.echo else None,
        "echo_ids": prompt_ids if req.echo else None,
        "prompt_only": req.max_tokens == 0,
    }
    if req.return_token_ids:
        options["return_token_ids"] = True
    return Generation(prompt_ids, checked_params(params), req.stream), options


# -- responses ------------------------------------------------------------------------------
def _token(tokenizer, token_id: int) -> tuple[str, list[int]]:
    text = tokenizer.decode([token_id])
    raw = tokenizer.token_bytes(token_id) if "\ufffd" in text else text.encode("utf-8")
    return text, list(raw)


def chat_logprobs(tokenizer, entries: list[dict]) -> dict[str, Any]:
    """Worker logprob entries ({"id", "logprob", "top": [[id, logprob], ...]}) -> OpenAI chat shape."""
    content = []
    for entry in entries:
        text, raw = _token(tokenizer, entry["id"])
        top = []
        for token_id, logprob in entry["top"]:
            t, b = _token(tokenizer, token_id)
            top.append({"token": t, "logprob": logprob, "bytes": b})
        content.append({"token": text, "logprob": entry["logprob"], "bytes": raw, "top_logprobs": top})
    return {"content": content}


def completion_logprobs(tokenizer, entries: list[dict], offset: int = 0) -> dict[str, Any]:
    """Worker logprob entries -> legacy completions shape (parallel lists)."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for entry in entries:
        text, _ = _token(tokenizer, entry["id"])
        tokens.append(text)
        token_logprobs.append(entry["logprob"])
        top.append({_token(tokenizer, i)[0]: lp for i, lp in entry["top"]})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def chat_response(request_id: str, info: ModelInfo, acc: Accumulator, options: dict) -> dict[str, Any]:
    def choice(c: Choice) -> dict[str, Any]:
        logprobs = chat_logprobs(info.tokenizer, c.logprobs) if options["logprobs"] is not None else None
        message, finish_reason = {"role": "assistant", "content": c.text}, c.finish_reason
        if options.get("tools") is not None:
            reply = ReplyCalls(parallel=options["tools"])
            content, calls = reply.feed(c.text, last=True)
            message["content"] = content or None
            if calls:
                message["tool_calls"] = [openai_tool_call(call) for call in calls]
                finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
        return {
            "index": c.index,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": finish_reason,
            "stop_reason": c.stop_reason,
            **_token_ids(c, options),
        }

    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": info.name,
        "choices": [choice(c) for c in acc.choices],
        "usage": acc.usage(),
        "system_fingerprint": None,
        "weights_version": acc.weights_version,
    }


def _token_ids(c: Choice, options: dict) -> dict[str, Any]:
    """With return_token_ids (vLLM's extension): the choice's token ids, and which weights
    version wrote which of them as [[version, tokens], ...] (they differ across a weight update)."""
    if not options.get("return_token_ids"):
        return {}
    return {"token_ids": c.token_ids, "version_spans": c.version_spans}


def completion_response(request_id: str, info: ModelInfo, acc: Accumulator, options: dict) -> dict[str, Any]:
    echo, prompt_only = options["echo"] or "", options.get("prompt_only", False)

    def choice(c: Choice) -> dict[str, Any]:
        logprobs = None
        if options["logprobs"] is not None:
            logprobs = _echo_logprobs(info.tokenizer, options["echo_ids"], acc.prompt_logprobs)
            if not prompt_only:
                generated = completion_logprobs(info.tokenizer, c.logprobs, len(echo))
                logprobs = generated if logprobs is None else {k: logprobs[k] + generated[k] for k in logprobs}
        return {
            "index": c.index,
            "text": echo + ("" if prompt_only else c.text),
            "logprobs": logprobs,
            "finish_reason": "length" if prompt_only else c.finish_reason,
            "stop_reason": None if prompt_only else c.stop_reason,
            **_token_ids(c, options),
        }

    usage = acc.usage()
    if prompt_only:
        usage = {**usage, "completion_tokens": 0, "total_tokens": usage["prompt_tokens"]}
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": info.name,
        "choices": [choice(c) for c in acc.choices],
        "usage": usage,
        "system_fingerprint": None,
        "weights_version": acc.weights_version,
    }


def _echo_logprobs(tokenizer, prompt_ids: list[int] | None, entries: list[dict | None] | None) -> dict | None:
    """The echoed prompt's part of legacy logprobs: its first token has none (null), as in
    OpenAI's and vLLM's answers; None when the prompt is not echoed."""
    if prompt_ids is None or entries is None:
        return None
    first = _token(tokenizer, prompt_ids[0])[0]
    rest = completion_logprobs(tokenizer, [e for e in entries[1:] if e is not None], len(first))
    return {
        "tokens": [first] + rest["tokens"],
        "token_logprobs": [None] + rest["token_logprobs"],
        "top_logprobs": [None] + rest["top_logprobs"],
        "text_offset": [0] + rest["text_offset"],
    }


class ChatStream:
    """Turns worker events into `chat.completion.chunk` objects, in OpenAI's order: a role chunk
    per choice, content chunks, the finish_reason, then (with include_usage) a usage-only chunk."""

    object = "chat.completion.chunk"

    def __init__(self, request_id: str, info: ModelInfo, n: int, options: dict) -> None:
        self.id, self.info, self.options = request_id, info, options
        self.created = int(time.time())
        self.acc = Accumulator(n)
        self.replies: dict[int, ReplyCalls] = {}  # with tools: each choice's calls so far

    def _chunk(self, choices: list[dict], **extra: Any) -> dict[str, Any]:
        chunk = {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.info.name,
            "choices": choices,
            "system_fingerprint": None,
            "weights_version": self.acc.weights_version,
        }
        if self.options["include_usage"]:
            chunk["usage"] = None
        chunk.update(extra)
        return chunk

    def start(self) -> list[dict]:
        return [
            self._chunk(
                [
                    {
                        "index": c.index,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    for c in self.acc.choices
                ]
            )
        ]

    def _delta(self, event: dict) -> tuple[dict[str, Any], str | None]:
        """The chunk's delta and finish_reason; with tools, text inside a call is held until the
        call is complete, then sent as one `tool_calls` entry the client appends by index."""
        finish = event["finish_reason"]
        if self.options.get("tools") is None:
            return ({"content": event["text"]} if event["text"] else {}), finish
        reply = self.replies.setdefault(event["index"], ReplyCalls(parallel=self.options["tools"]))
        before = len(reply.calls)
        content, calls = reply.feed(event["text"], last=finish is not None)
        delta: dict[str, Any] = {"content": content} if content else {}
        if calls:
            delta["tool_calls"] = [openai_tool_call(c, before + k) for k, c in enumerate(calls)]
        if finish == "stop" and reply.calls:
            finish = "tool_calls"
        return delta, finish

    def _logprobs(self, event: dict) -> dict | None:
        if self.options["logprobs"] is None:
            return None
        return chat_logprobs(self.info.tokenizer, event["logprobs"] or [])

    def _ids(self, event: dict) -> bool:
        """Whether the event's token ids must be sent (return_token_ids), even without text."""
        return bool(self.options.get("return_token_ids") and event["token_ids"])

    def events(self, events: list[dict]) -> list[dict]:
        chunks = []
        for event in events:
            self.acc.add(event)
            if not event["text"] and event["finish_reason"] is None and not event["logprobs"] and not self._ids(event):
                continue  # e.g. a stop token or half of a multibyte character: nothing to show yet
            delta, finish = self._delta(event)
            if not delta and finish is None and not event["logprobs"]:
                continue  # text held back (a tool call still being written)
            choice = {
                "index": event["index"],
                "delta": delta,
                "logprobs": self._logprobs(event),
                "finish_reason": finish,
            }
            if event["finish_reason"] is not None:
                choice["stop_reason"] = event["stop_reason"]
            if self.options.get("return_token_ids"):
                choice["token_ids"] = event["token_ids"]
            chunks.append(self._chunk([choice]))
        return chunks

    def end(self) -> list[dict]:
        if not self.options["include_usage"]:
            return []
        return [self._chunk([], usage=self.acc.usage())]


class CompletionStream(ChatStream):
    """Legacy completions stream: `text_completion` chunks with `text` instead of `delta`."""

    object = "text_completion"

    def __init__(self, request_id: str, info: ModelInfo, n: int, options: dict) -> None:
        super().__init__(request_id, info, n, options)
        self.offsets = [0] * n

    def start(self) -> list[dict]:
        echo = self.options["echo"]
        if not echo:
            return []
        return [
            self._chunk(
                [{"index": c.index, "text": echo, "logprobs": None, "finish_reason": None} for c in self.acc.choices]
            )
        ]

    def events(self, events: list[dict]) -> list[dict]:
        chunks = []
        for event in events:
            self.acc.add(event)
            if not event["text"] and event["finish_reason"] is None and not event["logprobs"] and not self._ids(event):
                continue
            i = event["index"]
            logprobs = None
            if self.options["logprobs"] is not None:
                logprobs = completion_logprobs(self.info.tokenizer, event["logprobs"] or [], self.offsets[i])
            self.offsets[i] += len(event["text"])
            choice = {"index": i, "text": event["text"], "logprobs": logprobs, "finish_reason": event["finish_reason"]}
            if event["finish_reason"] is not None:
                choice["stop_reason"] = event["stop_reason"]
            if self.options.get("return_token_ids"):
                choice["token_ids"] = event["token_ids"]
            chunks.append(self._chunk([choice]))
        return chunks
