"""A request body's first checks, before its model sees it, and the unknown-field error.

Bodies are checked as a whole first (`parse_json_object`): UTF-8, nesting depth and lone
surrogates are refused with a 400 here, so no later step (the request model, the tokenizer, the
chat template, a JSON reply echoing the text) meets text it cannot handle and fails with a 500.
The fields themselves are the request models' to check (request_models.py); an unknown one is
refused in each protocol's wording (`unknown_field_error`), or dropped by the server in lenient mode.
"""

from __future__ import annotations

import difflib
import json
from typing import Any

from .errors import APIError, bad_request

# Our requests nest 4 levels (messages[0].content[0].text); anything far deeper is not a request.
MAX_DEPTH = 32


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """A request body -> its JSON object, or a 400 that says what is wrong with it."""
    try:
        # Decoded here, strictly: json.loads(bytes) lets UTF-8-encoded surrogates through.
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(
            f"request body is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            "send JSON encoded as UTF-8"
        ) from None
    try:
        body = json.loads(text, parse_constant=_not_json)
    except json.JSONDecodeError as e:
        raise bad_request(
            f"request body is not valid JSON ({e}); send a JSON object with Content-Type: application/json"
        )
    except RecursionError:  # the decoder recurses once per nested array or object
        raise bad_request(_too_deep()) from None
    except ValueError as e:  # Python's cap on integer digits (4300), or NaN/Infinity (_not_json)
        raise bad_request(
            f"request body holds a number JSON requests cannot carry ({str(e).split(':')[0]}); "
            "send finite numbers of ordinary size"
        ) from None
    if not isinstance(body, dict):
        raise bad_request(f"request body must be a JSON object, got {type(body).__name__}")
    check_text(body)
    return body


def _not_json(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def check_text(body: dict[str, Any]) -> None:
    """Refuse nesting deeper than MAX_DEPTH and strings (values or keys) that are not Unicode
    text: JSON's \\ud800 escapes decode to lone surrogates, which no tokenizer or UTF-8 writer takes.
    Iterative, so a deep body cannot exhaust the stack here either."""
    stack: list[tuple[Any, str, int]] = [(body, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise bad_request(_too_deep(), path or None)
        if isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}" if path else key
                _check_string(key, path, what="a key")
                if isinstance(item, (str, dict, list)):
                    stack.append((item, where, depth + 1))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, (str, dict, list)):
                    stack.append((item, f"{path}[{i}]", depth + 1))
        else:
            _check_string(value, path)


def _check_string(text: str, path: str, what: str = "text") -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        char = f"\\u{ord(text[e.start]):04x}"
        where = f"'{path}'" if path else "the request body"
        raise bad_request(
            f"{where} holds {what} with a lone surrogate ({char} at character {e.start}), which is "
            "not Unicode text; send valid UTF-8 (escape only whole surrogate pairs, such as "
            "\\ud83d\\ude00)",
            path or None,
        ) from None


def _too_deep() -> str:
    return (
        f"request body nests arrays or objects more than {MAX_DEPTH} levels deep; no field of this API "
        "needs more than a few levels"
    )


def unknown_fields(body: dict[str, Any], accepted: frozenset[str]) -> list[str]:
    """Top-level fields of `body` that are not in `accepted`, in the order sent."""
    return [name for name in body if name not in accepted]


def did_you_mean(name: str, accepted: frozenset[str]) -> str:
    """' (did you mean 'max_tokens'?)' for a near miss, else ''."""
    close = difflib.get_close_matches(name, sorted(accepted), n=1, cutoff=0.75)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown_field_error(said: str, name: str) -> APIError:
    """A 400 for an unknown field: what the protocol itself says (``said``), then the fix."""
    return bad_request(
        f"{said}; remove it, or ask the operator to start the server with --no-strict-fields to ignore unknown fields",
        clip(name),
    )


def clip(name: str, most: int = 60) -> str:
    """A client-chosen name, short enough to quote in an error message."""
    return name if len(name) <= most else name[: most - 3] + "..."
