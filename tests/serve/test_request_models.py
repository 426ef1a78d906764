"""The request bodies as pydantic models: what each refuses and how the error names the field,
the OpenAPI document that shows them, and the lenient switch that lets unknown fields through.

Errors are checked through the protocols' parse functions (what a client sees: status, `param`,
wording) and on the models themselves (the pydantic location).
"""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from astrai.core.tokenizer import AutoTokenizer
from astrai.serve import anthropic_protocol as anth
from astrai.serve import openai_protocol as oai
from astrai.serve.anthropic_models import MessagesRequest
from astrai.serve.config import build_config
from astrai.serve.errors import APIError
from astrai.serve.generation import ModelInfo
from astrai.serve.openai_models import ChatCompletionRequest, CompletionRequest

CHAT = {"messages": [{"role": "user", "content": "Hello"}]}
COMPLETION = {"prompt": "Hello", "max_tokens": 3}
MESSAGE = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
ROUTES = {
    "/v1/chat/completions": (ChatCompletionRequest, CHAT),
    "/v1/completions": (CompletionRequest, COMPLETION),
    "/v1/messages": (MessagesRequest, MESSAGE),
}


@pytest.fixture(scope="module")
def info(model_dir) -> ModelInfo:
    return ModelInfo("tiny", AutoTokenizer.from_pretrained(model_dir), max_model_len=64, max_batch_size=8)


def error_of(parse, body, info) -> APIError:
    with pytest.raises(APIError) as exc:
        parse(body, info)
    return exc.value


@pytest.mark.parametrize(
    "parse, body, param, message",
    [
        # wrong types: booleans are not numbers, strings are not floats, 1 is not a boolean
        (oai.parse_chat, {**CHAT, "temperature": True}, "temperature", "'temperature' must be a number"),
        (oai.parse_chat, {**CHAT, "stream": 1}, "stream", "'stream' must be true or false, got 1"),
        (oai.parse_chat, {**CHAT, "n": 1.5}, "n", "'n' must be an integer at least 1, got 1.5"),
        (oai.parse_chat, {**CHAT, "messages": [{"role": "user", "content": 5}]}, "messages[0].content", "got int"),
        (oai.parse_completion, {**COMPLETION, "prompt": [1, "a"]}, "prompt", "non-negative token ids"),
        (oai.parse_completion, {**COMPLETION, "echo": "yes"}, "echo", "'echo' must be true or false"),
        (anth.parse_messages, {**MESSAGE, "top_k": "5"}, "top_k", "'top_k' must be an integer at least 0"),
        (anth.parse_messages, {**MESSAGE, "system": 3}, "system", "system: must be a string or a list"),
        # out of range
        (oai.parse_chat, {**CHAT, "top_p": 0}, "top_p", "greater than 0.0 and at most 1.0, got 0"),
        (oai.parse_chat, {**CHAT, "stop": ["x"] * 17}, "stop", "'stop' may hold at most 16 sequences, got 17"),
        (oai.parse_completion, {**COMPLETION, "logprobs": 6}, "logprobs", "between 0 and 5, got 6"),
        (oai.parse_completion, {**COMPLETION, "max_tokens": 0}, "max_tokens", "at least 1, got 0"),
        (anth.parse_messages, {**MESSAGE, "temperature": 1.5}, "temperature", "at most 1.0, got 1.5"),
        (anth.parse_messages, {**MESSAGE, "messages": []}, "messages", "messages: must be a non-empty list"),
        # unknown fields, in each protocol's wording
        (oai.parse_chat, {**CHAT, "max_token": 5}, "max_token", "Unrecognized request argument supplied: max_token"),
        (oai.parse_completion, {**COMPLETION, "suffixx": ""}, "suffixx", "did you mean 'suffix'?"),
        (anth.parse_messages, {**MESSAGE, "seed": 1}, "seed", "seed: Extra inputs are not permitted"),
    ],
)
def test_each_model_refuses_a_wrong_type_a_value_out_of_range_and_an_unknown_field_naming_it(
    info, parse, body, param, message
):
    err = error_of(parse, body, info)
    assert err.status == 400 and err.param == param
    assert message in err.message, err.message


@pytest.mark.parametrize(
    "model, body, loc",
    [
        (ChatCompletionRequest, {**CHAT, "temperature": "0.5"}, ("temperature",)),
        (ChatCompletionRequest, {**CHAT, "frobnicate": 1}, ("frobnicate",)),
        (CompletionRequest, {**COMPLETION, "best_of": 0}, ("best_of",)),
        (MessagesRequest, {**MESSAGE, "messages": [{"role": "system", "content": "x"}]}, ("messages", 0, "role")),
        (MessagesRequest, {"messages": MESSAGE["messages"]}, ("max_tokens",)),
    ],
)
def test_the_models_themselves_locate_the_bad_field(model, body, loc):
    with pytest.raises(ValidationError) as exc:
        model.model_validate(body)
    assert loc in [e["loc"] for e in exc.value.errors()]


def test_null_means_not_sent_and_nested_unknown_keys_are_ignored():
    chat = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x", "name": "n"}], "temperature": None, "seed": None}
    )
    assert chat.temperature == 1.0 and chat.seed is None
    message = MessagesRequest.model_validate(
        {**MESSAGE, "messages": [{"role": "user", "content": [{"type": "text", "text": "x", "cache_control": {}}]}]}
    )
    assert message.messages[0].content[0].text == "x"


def _served_schema(**config) -> dict:
    from astrai.serve.launch import build_server

    server = build_server(build_config(model="/m", device="cpu", **config), ModelInfo("m", None, 64))
    client = TestClient(server.app)
    key = config.get("api_key")
    if key:  # behind the key, as every route but /health
        assert client.get("/openapi.json").status_code == 401
    return client.get("/openapi.json", headers={"Authorization": f"Bearer {key}"} if key else {}).json()


def test_the_openapi_schema_lists_the_three_request_bodies_fields():
    doc = _served_schema(api_key="k", docs=True)
    schemas = doc["components"]["schemas"]
    for path, (model, _) in ROUTES.items():
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        name = body["$ref"].rsplit("/", 1)[-1]
        assert name == model.__name__
        assert set(schemas[name]["properties"]) == set(model.model_fields), path
        assert schemas[name]["additionalProperties"] is False
    chat = schemas["ChatCompletionRequest"]
    assert chat["required"] == ["messages"]
    assert chat["properties"]["temperature"] == {  # null: not sent (RequestModel._null_is_not_sent)
        "anyOf": [{"maximum": 2.0, "minimum": 0.0, "type": "number"}, {"type": "null"}],
        "default": 1.0,
        "title": "Temperature",
    }
    assert schemas["MessagesRequest"]["required"] == ["max_tokens", "messages"]
    refs = {ref.rsplit("/", 1)[-1] for ref in _refs(doc)}
    assert refs <= set(schemas), refs - set(schemas)  # every nested model is defined


def test_the_openapi_schema_documents_each_routes_errors_in_its_protocols_shape():
    doc = _served_schema(api_key="k", docs=True)
    schemas = doc["components"]["schemas"]
    for path in ROUTES:
        responses = doc["paths"][path]["post"]["responses"]
        assert set(responses) == {"200", "400", "401", "404", "413", "500", "503"}, path
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
        error = "AnthropicErrorResponse" if path == "/v1/messages" else "OpenAIErrorResponse"
        for status in ("400", "401", "413"):
            assert responses[status]["content"]["application/json"]["schema"] == {
                "$ref": f"#/components/schemas/{error}"
            }
    assert set(schemas["OpenAIErrorResponse"]["properties"]) == {"error"}
    assert set(schemas["OpenAIErrorDetail"]["properties"]) == {"message", "type", "param", "code"}
    assert schemas["AnthropicErrorResponse"]["properties"]["type"] == {
        "const": "error",
        "title": "Type",
        "type": "string",
    }


def test_the_documented_chat_message_refuses_what_the_server_refuses():
    from jsonschema_rs import Draft202012Validator

    doc = _served_schema(docs=True)
    validator = Draft202012Validator({"$ref": "#/components/schemas/ChatMessage", "components": doc["components"]})
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    cases = [
        ({"role": "user", "content": "x"}, True),
        ({"role": "assistant", "tool_calls": [call]}, True),
        ({"role": "assistant", "content": None, "tool_calls": [call]}, True),
        ({"role": "tool", "content": None}, False),
        ({"role": "assistant"}, False),
        ({"role": "assistant", "tool_calls": []}, False),
        ({"role": "user", "content": "x", "tool_calls": [call]}, False),
    ]
    for message, accepted in cases:
        assert validator.is_valid(message) is accepted, message
        body = {"messages": [message]}
        if accepted:
            ChatCompletionRequest.model_validate(body)
        else:
            with pytest.raises(ValidationError):
                ChatCompletionRequest.model_validate(body)


def _refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _spec(strict: bool, info: ModelInfo):
    from astrai.serve.control_plane import ControlPlane
    from astrai.serve.server import ProtocolSpec

    return ProtocolSpec(build_config(model="/m", device="cpu", strict_fields=strict), info, ControlPlane(1))


@pytest.mark.parametrize(
    "route, parse, body, name",
    [
        (
            "/v1/chat/completions",
            oai.parse_chat,
            b'{"messages": [{"role": "user", "content": "Hi"}], "max_token": 5}',
            "max_token",
        ),
        (
            "/v1/messages",
            anth.parse_messages,
            b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "n": 2}',
            "n",
        ),
    ],
)
def test_a_lenient_server_accepts_an_unknown_field_and_logs_it_once(info, caplog, route, parse, body, name):
    with pytest.raises(APIError) as exc:
        _spec(True, info)._read(body, route, parse, info)
    assert exc.value.status == 400 and exc.value.param == name
    lenient = _spec(False, info)
    with caplog.at_level(logging.WARNING, logger="astrai.serve"):
        for _ in range(2):
            gen, _ = lenient._read(body, route, parse, info)
            assert gen.prompt_ids
    assert sum("ignoring unknown request field" in r.getMessage() for r in caplog.records) == 1
