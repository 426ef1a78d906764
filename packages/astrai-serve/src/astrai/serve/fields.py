"""Typed readers for request fields: each error names the field, what was sent and what is allowed.

JSON `true` is an int in Python, so numeric readers reject booleans explicitly.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import APIError, bad_request


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"request body is not valid JSON ({e}); send a JSON object with Content-Type: application/json")
    if not isinstance(body, dict):
        raise bad_request(f"request body must be a JSON object, got {type(body).__name__}")
    return body


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
        raise bad_request(f"'{name}' must be a non-empty string or a list of non-empty strings, got {_show(value)}", name)
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
