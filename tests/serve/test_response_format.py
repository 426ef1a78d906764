"""response_format through the server (structured output by constrained decoding in the
engine): the official openai client asks for a JSON schema or any JSON object, on chat and on
completions, and every reply of a random-weight model parses and validates; an invalid schema
is a 400."""

from __future__ import annotations

import json

import openai
import pytest
from conftest import MODEL_NAME

SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "enum": ["yes", "no"]},
        "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}}


def _valid(doc) -> bool:
    return (
        set(doc) == {"answer", "confidence"}
        and doc["answer"] in ("yes", "no")
        and isinstance(doc["confidence"], int)
        and 0 <= doc["confidence"] <= 100
    )


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0)


def test_chat_with_a_json_schema_returns_json_that_validates_every_time(client):
    for seed in range(10):
        out = client.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": "Is the sky blue?"}],
            response_format=FORMAT,
            max_tokens=200,
            temperature=1.0,
            seed=seed,
        )
        assert _valid(json.loads(out.choices[0].message.content)), out.choices[0].message.content
        assert out.choices[0].finish_reason == "stop"


def test_streamed_chat_json_object_and_completions_with_a_schema(client):
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Describe a cat."}],
        response_format={"type": "json_object"},
        max_tokens=300,
        temperature=1.0,
        seed=1,
        stream=True,
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert isinstance(json.loads(text), dict)
    out = client.completions.create(
        model=MODEL_NAME, prompt="verdict:", max_tokens=200, seed=2, extra_body={"response_format": FORMAT}
    )
    assert _valid(json.loads(out.choices[0].text))


def test_a_schema_the_grammar_engine_cannot_follow_is_a_400(client):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}
    with pytest.raises(openai.BadRequestError, match="structured_output"):
        client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], response_format=bad, max_tokens=5
        )
