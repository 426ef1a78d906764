"""Typed readers for request fields: each error names the field, what was sent and what is allowed.

JSON `true` is an int in Python, so numeric readers reject booleans explicitly. Bodies are
checked as a whole first (`parse_json_object`): UTF-8, nesting depth and lone surrogates are
refused with a 400 here, so no later step (the tokenizer, the chat template, a JSON reply
echoing the text) meets text it cannot handle and fails with a 500.
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


def _show(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def number(body: dict, name: str, default: float | None, lo: float, hi: float, lo_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or value < lo or value > hi or (lo_open and value == lo):
        low = f"greater than {lo}" if lo_open else f"at least {lo}"
        raise bad_request(f"'{name}' must be a number {low} and at most {hi}, got {_show(value)}", name)
    return float(value)


def integer(body: dict, name: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
        allowed = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise bad_request(f"'{name}' must be an integer {allowed}, got {_show(value)}", name)
    return value


def boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be true or false, got {_show(value)}", name)
    return value


def string_list(body: dict, name: str, max_items: int = 16) -> list[str]:
    """A string or a list of non-empty strings (OpenAI `stop`, Anthropic `stop_sequences`)."""
    value = body.get(name)
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise bad_request(
            f"'{name}' must be a non-empty string or a list of non-empty strings, got {_show(value)}", name
        )
    if len(items) > max_items:
        raise bad_request(f"'{name}' may hold at most {max_items} sequences, got {len(items)}", name)
    return items


def int_list(body: dict, name: str) -> list[int]:
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        raise bad_request(f"'{name}' must be a list of non-negative token ids, got {_show(value)}", name)
    return value


def reject_unsupported(body: dict, names: dict[str, str]) -> None:
    """Fail loudly on fields that would change the result if silently ignored."""
    for name, why in names.items():
        value = body.get(name)
        if value not in (None, [], {}, False):
            raise APIError(400, f"'{name}' is not supported by this server: {why}", param=name)
