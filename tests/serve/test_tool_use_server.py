"""Tool calling through the server, with the official clients: a two-turn loop (call -> tool
result -> final answer) on both protocols, streamed and not, on a random-weight model. Forced
choices (OpenAI "required" / a named function, Anthropic "any" / "tool") are enforced by
constrained decoding, so even random weights produce a valid call of a declared function."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest
from conftest import MODEL_NAME

PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
WEATHER = {"name": "get_weather", "description": "The forecast for a city", "parameters": PARAMETERS}
CLOCK = {
    "name": "get_time",
    "description": "The time now",
    "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
}
TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": CLOCK}]
QUESTION = [{"role": "user", "content": "Weather in Paris for two days?"}]


def _valid(name: str, arguments: dict) -> bool:
    if name == "get_time":
        return arguments == {}
    return (
        name == "get_weather"
        and set(arguments) == {"city", "days"}
        and arguments["city"] in ("Paris", "Rome")
        and type(arguments["days"]) is int
        and 1 <= arguments["days"] <= 7
    )


@pytest.fixture
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0)


@pytest.fixture
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key=server.api_key, max_retries=0)


def _openai_answer(oai, messages, **extra):
    return oai.chat.completions.create(model=MODEL_NAME, messages=messages, tools=TOOLS, max_tokens=400, **extra)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_openai_required_choice_calls_a_declared_tool_then_answers_from_its_result(oai, seed):
    out = _openai_answer(oai, QUESTION, tool_choice="required", seed=seed, temperature=1.0)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert calls and all(c.type == "function" and c.id.startswith("call_") for c in calls)
    assert all(_valid(c.function.name, json.loads(c.function.arguments)) for c in calls)
    history = [*QUESTION, choice.message.model_dump(exclude_none=True)]
    history += [{"role": "tool", "tool_call_id": c.id, "content": "sunny, 21 C"} for c in calls]
    final = _openai_answer(oai, history, tool_choice="none", seed=seed, max_completion_tokens=8)
    assert final.choices[0].message.tool_calls is None
    assert isinstance(final.choices[0].message.content, str)
    assert final.choices[0].finish_reason in ("stop", "length")
    alone = _openai_answer(oai, QUESTION, tool_choice="none", max_completion_tokens=1)
    assert final.usage.prompt_tokens > alone.usage.prompt_tokens + 20  # the call and its result were in the prompt


def test_openai_named_choice_streamed_is_assembled_by_the_client_into_one_call(oai):
    named = {"type": "function", "function": {"name": "get_weather"}}
    with oai.chat.completions.stream(
        model=MODEL_NAME, messages=QUESTION, tools=TOOLS, tool_choice=named, max_tokens=400, seed=3
    ) as stream:
        events = list(stream)
        completion = stream.get_final_completion()
    kinds = {event.type for event in events}
    shown = "".join(e.delta for e in events if e.type == "content.delta")
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and _valid("get_weather", json.loads(call.function.arguments))
    assert "tool_calls.function.arguments.delta" in kinds and shown == ""  # no call text leaks as content
    history = [*QUESTION, choice.message.model_dump(exclude_none=True)]
    history.append({"role": "tool", "tool_call_id": call.id, "content": "rain"})
    stream = oai.chat.completions.create(
        model=MODEL_NAME, messages=history, tools=TOOLS, max_tokens=8, stream=True, seed=3
    )
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_openai_single_call_when_parallel_calls_are_off(oai):
    for seed in range(4):
        out = _openai_answer(oai, QUESTION, tool_choice="required", parallel_tool_calls=False, seed=seed)
        assert len(out.choices[0].message.tool_calls) == 1


def test_openai_auto_choice_with_a_random_model_answers_in_text_or_calls_without_error(oai):
    for seed in range(3):
        out = _openai_answer(oai, QUESTION, seed=seed, max_completion_tokens=12)
        message = out.choices[0].message
        assert message.content is not None or message.tool_calls


def _claude_tools():
    return [
        {"name": f["name"], "description": f["description"], "input_schema": f["parameters"]} for f in (WEATHER, CLOCK)
    ]


def test_anthropic_any_choice_uses_a_tool_then_answers_from_its_result(claude):
    out = claude.messages.create(
        model=MODEL_NAME, max_tokens=400, messages=QUESTION, tools=_claude_tools(), tool_choice={"type": "any"}
    )
    assert out.stop_reason == "tool_use"
    uses = [b for b in out.content if b.type == "tool_use"]
    assert uses and all(b.id.startswith("toolu_") and _valid(b.name, b.input) for b in uses)
    history = [
        *QUESTION,
        {"role": "assistant", "content": [b.model_dump() for b in out.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": b.id, "content": "sunny"} for b in uses]},
    ]
    final = claude.messages.create(model=MODEL_NAME, max_tokens=8, messages=history, tools=_claude_tools())
    assert final.content and final.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert final.usage.input_tokens > out.usage.input_tokens


def test_anthropic_named_tool_streamed_arrives_as_an_input_json_delta_the_client_assembles(claude):
    with claude.messages.stream(
        model=MODEL_NAME,
        max_tokens=400,
        messages=QUESTION,
        tools=_claude_tools(),
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
    ) as stream:
        kinds = [event.type for event in stream]
        message = stream.get_final_message()
    assert message.stop_reason == "tool_use"
    (use,) = [b for b in message.content if b.type == "tool_use"]
    assert use.name == "get_weather" and _valid("get_weather", use.input)
    assert "input_json" in kinds and kinds[-1] == "message_stop"
