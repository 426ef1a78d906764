"""What both protocols' request models are made of: strict field types, their wording, and the
mapping from a pydantic ValidationError to the 400 a client reads.

Request bodies are pydantic models (openai_models.py, anthropic_models.py) rather than code that
walks each body field by field: a field's type, bounds and default are declared once, pydantic
checks them, and the same declaration is the JSON Schema the OpenAPI document shows
(openapi_doc.py). Models are strict, as the hand-written readers were: JSON `true` is
not a number, "0.5" is not a float, 1 is not a boolean. Top-level nulls mean "not sent" (OpenAI's
SDKs send them), and unknown top-level fields are refused (`extra='forbid'`); in lenient mode
(--no-strict-fields) server.py drops and logs them before the model sees the body.

pydantic's own messages ("Input should be a valid number") name neither the allowed range nor
the fix, so each field carries its `Wording` and `field_error` writes our message from it,
naming the field (APIError.param) as OpenAI's and Anthropic's own errors do.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .errors import APIError, bad_request

# Tags of the str-or-list unions (`text_or`, `sequences`); error locations name the branch taken.
STRING, LIST = "string", "list"


@dataclass(frozen=True)
class Wording:
    """How a field's errors read. `what`: "'top_p' must be <what>, got 0"; `message`: the whole
    message instead ({name}: the field's); `required`: when it is missing; `too_many`: what a
    too-long list holds; `explain(error, body)`: an APIError for errors inside a nested value."""

    what: str | None = None
    message: str | None = None
    required: str | None = None
    too_many: str | None = None
    explain: Callable[[dict, dict], APIError] | None = None


def _null_admitted(schema: dict[str, Any], model: type) -> None:
    """Show in the JSON Schema what _null_is_not_sent accepts: an optional field sent as null."""
    required = set(schema.get("required", ()))
    properties = schema.get("properties", {})
    for name, field in properties.items():
        if name in required or not field or _admits_null(field):
            continue
        kept = {key: field.pop(key) for key in ("title", "default", "description") if key in field}
        properties[name] = {"anyOf": [field, {"type": "null"}], **kept}


def _admits_null(field: dict[str, Any]) -> bool:
    return field.get("type") == "null" or any(branch.get("type") == "null" for branch in field.get("anyOf", ()))


class RequestModel(BaseModel):
    """A request body: strict types, unknown top-level fields refused, null = not sent."""

    model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra=_null_admitted)
    # Fields whose errors are reported first, in this order (the order the hand-written parsers
    # checked them in); the others follow in declaration order.
    check_order: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _null_is_not_sent(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}

    @classmethod
    def accepted(cls) -> frozenset[str]:
        """Every top-level field this route takes."""
        return frozenset(cls.model_fields)


class Part(BaseModel):
    """A nested object (a message, a content part): strict types, other keys ignored as before."""

    model_config = ConfigDict(strict=True, extra="ignore")


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value  # 2.0 counts as 2


def number(lo: float, hi: float, lo_open: bool = False) -> Any:
    low = f"greater than {lo}" if lo_open else f"at least {lo}"
    bound = Field(gt=lo, le=hi) if lo_open else Field(ge=lo, le=hi)
    return Annotated[float, bound, Wording(what=f"a number {low} and at most {hi}")]


def integer(lo: int, hi: int | None = None) -> Any:
    allowed = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
    return Annotated[int, Field(ge=lo, le=hi), BeforeValidator(_integral), Wording(what=f"an integer {allowed}")]


Flag = Annotated[bool, Wording(what="true or false")]
TokenId = Annotated[int, Field(ge=0)]
TokenIds = Annotated[list[TokenId], Wording(what="a list of non-negative token ids")]
Anything = Annotated[Any, Field(description="accepted and ignored: it does not change the answer here")]


def _string_or_list(value: Any) -> str | None:
    return STRING if isinstance(value, str) else LIST if isinstance(value, list) else None


def text_or(item: Any) -> Any:
    """A string, or a list of `item`: tagged, so an error names the one branch taken."""
    return Annotated[
        Annotated[str, Tag(STRING)] | Annotated[list[item], Tag(LIST)],
        Discriminator(_string_or_list),
    ]


def sequences(most: int = 16) -> Any:
    """OpenAI `stop`, Anthropic `stop_sequences`: a non-empty string or a list of them."""
    one = Annotated[str, Field(min_length=1)]
    return Annotated[
        Annotated[one, Tag(STRING)] | Annotated[list[one], Field(max_length=most), Tag(LIST)],
        Discriminator(_string_or_list),
        Wording(what="a non-empty string or a list of non-empty strings", too_many="sequences"),
    ]


def refused(why: str, ok: Callable[[Any], bool], message: str, description: str) -> Any:
    """A field that would change the answer in a way we cannot honour: values other than those
    `ok` allows are refused with `message` rather than silently ignored."""

    def check(value: Any) -> Any:
        if not ok(value):
            raise PydanticCustomError("refused", why)
        return value

    return Annotated[Any, AfterValidator(check), Field(description=description), Wording(message=message)]


def unsupported(why: str) -> Any:
    """Refused unless empty."""
    return refused(
        why,
        lambda value: value in ([], {}, False),
        f"'{{name}}' is not supported by this server: {why}",
        f"not supported (refused unless empty): {why}",
    )


# -- errors ---------------------------------------------------------------------------------
def validated(model: type[RequestModel], body: dict, unknown: Callable, first: Callable[[], None]) -> Any:
    """`body` as `model`, or the APIError for its first problem. As before the models, an
    unknown field (`unknown(name, accepted)`) is reported before anything else, then whatever
    `first()` raises (the model check, a 404), then the first field error: by the model's
    `check_order`, then its declaration order."""
    try:
        request = model.model_validate(body)
    except ValidationError as e:
        rank = {name: i for i, name in enumerate(model.check_order)}
        errors = sorted(e.errors(include_url=False), key=lambda err: rank.get(err["loc"][0], len(rank)))
        extra = [err for err in errors if err["type"] == "extra_forbidden"]
        if extra:
            raise unknown(str(extra[0]["loc"][0]), model.accepted()) from None
        first()
        raise field_error(model, body, errors[0]) from None
    first()
    return request


def wording(model: type[BaseModel], name: str) -> Wording:
    """The field's Wording; nested Annotated types each add theirs, the outer ones win."""
    field = model.model_fields.get(name)
    merged: dict[str, Any] = {"what": "valid"}
    for says in [m for m in field.metadata if isinstance(m, Wording)] if field else []:
        merged.update({k: v for k, v in vars(says).items() if v is not None})
    return Wording(**merged)


def field_error(model: type[BaseModel], body: dict, error: dict) -> APIError:
    """Our message for one pydantic error at a top-level field (or inside it, via `explain`)."""
    name = str(error["loc"][0])
    says = wording(model, name)
    if error["type"] == "missing" and len(error["loc"]) == 1:
        return bad_request(says.required or f"'{name}' is required", name)
    if says.explain is not None:
        return says.explain(error, body)
    if says.message is not None:
        return bad_request(says.message.replace("{name}", name), name)
    value = body.get(name)
    if error["type"] == "too_long" and says.too_many:
        return bad_request(
            f"'{name}' may hold at most {error['ctx']['max_length']} {says.too_many}, got {len(value)}", name
        )
    return bad_request(f"'{name}' must be {says.what}, got {show(value)}", name)


def show(value: Any) -> str:
    """A client's value, short enough to quote in a message (containers by their type)."""
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def raw_at(body: Any, loc: tuple) -> Any:
    """The value the client sent at a pydantic error location (union tags skipped), else None."""
    for key in loc:
        if key in (STRING, LIST) and not isinstance(body, dict):
            continue
        try:
            body = body[key]
        except (KeyError, IndexError, TypeError):
            return None
    return body
