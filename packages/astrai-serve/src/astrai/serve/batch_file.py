"""`astrai-serve run-batch`: a file of OpenAI Batch requests, run offline through the engine.

Why: labelling or evaluating a dataset needs no server and no client. Each line of the input
(`{"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body"}`,
the OpenAI Batch input format) is checked by the same protocol code as the HTTP routes; the
good ones go to one engine together, so it runs at full batch, with a progress bar; a bad line
becomes an error record instead of stopping the run. The output has one line per input line,
in input order, in the OpenAI Batch output format:
  {"id", "custom_id", "response": {"status_code": 200, "request_id", "body"}, "error": null}
A request the protocol refuses gets its 4xx and the protocol's error body as its response; a
line that is not a request at all (not JSON, no custom_id, another url or method) gets
`"response": null` and `"error": {"code", "message"}`.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import openai_protocol
from .errors import APIError, openai_error_body
from .generation import Accumulator, Generation, ModelInfo
from .relay import logprob_dicts
from .request_fields import parse_json_object, unknown_fields

log = logging.getLogger("astrai.serve")

# url -> (parse, respond, id prefix, the fields it takes)
ROUTES: dict[str, tuple[Callable, Callable, str, frozenset[str]]] = {
    "/v1/chat/completions": (
        openai_protocol.parse_chat,
        openai_protocol.chat_response,
        "chatcmpl",
        openai_protocol.CHAT_FIELDS,
    ),
    "/v1/completions": (
        openai_protocol.parse_completion,
        openai_protocol.completion_response,
        "cmpl",
        openai_protocol.COMPLETION_FIELDS,
    ),
}


@dataclass
class BatchLine:
    """One input line and, once run, what to write for it."""

    number: int  # 1-based line number in the input file
    custom_id: str | None = None
    url: str | None = None
    generation: Generation | None = None
    options: dict[str, Any] | None = None
    request_id: str | None = None
    response: dict[str, Any] | None = None  # {"status_code", "request_id", "body"}
    error: dict[str, str] | None = None  # {"code", "message"}: the line is not a request

    @property
    def ok(self) -> bool:
        return self.response is not None and self.response["status_code"] == 200

    def record(self) -> dict[str, Any]:
        return {
            "id": f"batch_req_{uuid.uuid4().hex}",
            "custom_id": self.custom_id,
            "response": self.response,
            "error": self.error,
        }


def read_line(number: int, text: str, info: ModelInfo, strict_fields: bool = True) -> BatchLine:
    """Parse one input line into a BatchLine with a generation, a 4xx response or an error."""
    line = BatchLine(number)
    try:  # the server's body checks: JSON, an object, nesting depth, no lone surrogates
        request = parse_json_object(text.encode("utf-8", "surrogatepass"))
    except APIError as e:
        return _not_a_request(line, f"line {number}: {e.message}")
    line.custom_id = request.get("custom_id") if isinstance(request.get("custom_id"), str) else None
    if not line.custom_id:
        return _not_a_request(line, f"line {number}: 'custom_id' must be a non-empty string")
    line.url = request.get("url")
    if line.url not in ROUTES:
        return _not_a_request(line, f"line {number}: 'url' {line.url!r} is not one of {', '.join(ROUTES)}")
    if request.get("method", "POST") != "POST":
        return _not_a_request(line, f"line {number}: 'method' must be POST, got {request.get('method')!r}")
    parse, _, prefix, accepted = ROUTES[line.url]
    line.request_id = openai_protocol.new_id(prefix)
    try:
        body = request.get("body")
        if not isinstance(body, dict):
            raise APIError(400, f"'body' must be a JSON object (the request), got {type(body).__name__}", "body")
        unknown = unknown_fields(body, accepted)
        if unknown and strict_fields:
            raise openai_protocol.unknown_field(unknown[0], accepted)
        if body.get("stream"):
            raise APIError(400, "'stream' is not supported in a batch file: each result is written whole", "stream")
        line.generation, line.options = parse(body, info)
    except APIError as e:
        line.response = {"status_code": e.status, "request_id": line.request_id, "body": openai_error_body(e)}
    return line


def _not_a_request(line: BatchLine, message: str) -> BatchLine:
    line.error = {"code": "invalid_request", "message": message}
    return line


def read_lines(texts: Iterable[str], info: ModelInfo, strict_fields: bool = True) -> list[BatchLine]:
    """Every non-blank line, parsed (blank lines are skipped, as JSON Lines readers do)."""
    return [read_line(n, text, info, strict_fields) for n, text in enumerate(texts, 1) if text.strip()]


def run(engine, info: ModelInfo, lines: list[BatchLine], progress: bool = True) -> None:
    """Generate for every line that holds a generation, all at once, and set its response.

    The protocol has checked each request as the server does; should the engine still refuse
    one ("prompts[i]: ..."), that line gets a 400 and the others run without it."""
    from astrai.core.engine import SamplingParams
    from astrai.core.errors import AstraiError

    todo = [line for line in lines if line.generation is not None and line.response is None]
    while todo:
        try:
            completions = engine.generate(
                [line.generation.prompt_ids for line in todo],
                [SamplingParams(**line.generation.params) for line in todo],
                use_tqdm=progress,
            )
        except AstraiError as e:
            index = _failed_prompt(str(e))
            if index is None:
                raise
            bad = todo.pop(index)
            bad.response = _error_response(bad, APIError(400, str(e).partition(": ")[2], "body"))
            continue
        for line, completion in zip(todo, completions):
            line.response = _response(line, info, completion)
        return


def _failed_prompt(message: str) -> int | None:
    """The index in "prompts[3]: ..." (the engine's error for one of generate's prompts)."""
    head = message.partition(":")[0]
    if head.startswith("prompts[") and head.endswith("]") and head[8:-1].isdigit():
        return int(head[8:-1])
    return None


def _response(line: BatchLine, info: ModelInfo, completion) -> dict[str, Any]:
    if completion.error is not None:
        return _error_response(line, APIError(500, f"generation failed: {completion.error}"))
    acc = Accumulator(len(completion.samples))
    for sample in completion.samples:
        acc.add(
            {
                "index": sample.index,
                "text": sample.text,
                "token_ids": sample.token_ids,
                "logprobs": logprob_dicts(sample.logprobs),
                "finish_reason": sample.finish_reason,
                "stop_reason": sample.stop_reason,
                "prompt_tokens": completion.prompt_tokens,
            }
        )
    respond = ROUTES[line.url][1]
    return {
        "status_code": 200,
        "request_id": line.request_id,
        "body": respond(line.request_id, info, acc, line.options),
    }


def _error_response(line: BatchLine, error: APIError) -> dict[str, Any]:
    return {"status_code": error.status, "request_id": line.request_id, "body": openai_error_body(error)}


def write_results(path: str | Path, lines: list[BatchLine]) -> Path:
    """One JSON line per input line, in order; written to a temporary name, then renamed, so a
    crash never leaves a half-written results file that looks complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line.record(), ensure_ascii=False) + "\n")
    partial.replace(path)
    return path
