"""Tool calls in model text (astrai.core.tool_calls): the streamed split equals the whole-text
split however the text is cut, blocks that are not calls stay text, and the forced-call grammar
makes a random-weight model's replies calls of the declared functions with valid arguments."""

from __future__ import annotations

import random

import pytest

from astrai.core.engine import InferenceEngine, SamplingParams
from astrai.core.errors import AstraiError
from astrai.core.tool_calls import ToolCall, ToolCallParser, function_specs, split_tool_calls, tool_call_grammar

WEATHER = {
    "name": "get_weather",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "enum": ["Paris", "Rome"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city", "days"],
        "additionalProperties": False,
    },
}
CLOCK = {"name": "get_time", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}
REPLY = (
    "Let me look.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": "{}"}\n</tool_call>\n'
)


def test_a_reply_splits_into_its_text_and_its_calls():
    content, calls = split_tool_calls(REPLY)
    assert content == "Let me look."
    assert calls == [ToolCall("get_weather", {"city": "Paris", "days": 2}), ToolCall("get_time", {})]


def test_streamed_pieces_give_the_same_split_however_the_text_is_cut():
    rng = random.Random(0)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(REPLY)), rng.randint(1, 30)))
        pieces = [REPLY[a:b] for a, b in zip([0, *cuts], [*cuts, len(REPLY)])]
        parser, out = ToolCallParser(), []
        for piece in pieces:
            out += parser.feed(piece)
        out += parser.finish()
        assert "".join(p for p in out if isinstance(p, str)) == "Let me look."
        assert [p for p in out if isinstance(p, ToolCall)] == split_tool_calls(REPLY)[1]


def test_text_that_only_looks_like_a_tag_is_shown_whole():
    assert split_tool_calls("a <tool x> b <tool_cal") == ("a <tool x> b <tool_cal", [])


def test_a_block_that_is_not_a_call_stays_text_and_an_unclosed_one_too():
    assert split_tool_calls("<tool_call>\n{not json}\n</tool_call> ok") == (
        "<tool_call>\n{not json}\n</tool_call> ok",
        [],
    )
    assert split_tool_calls('x <tool_call>\n{"name": "f"') == ('x<tool_call>\n{"name": "f"', [])
    assert split_tool_calls('<tool_call>{"name": 3, "arguments": {}}</tool_call>')[1] == []


def test_function_specs_accept_openai_entries_and_bare_functions_and_name_the_bad_one():
    assert function_specs([{"type": "function", "function": WEATHER}, CLOCK]) == [WEATHER, CLOCK]
    with pytest.raises(AstraiError, match=r"tools\[1\]"):
        function_specs([CLOCK, {"type": "function"}])


def _valid(call: ToolCall) -> bool:
    if call.name == "get_time":
        return call.arguments == {}
    args = call.arguments
    return (
        call.name == "get_weather"
        and set(args) == {"city", "days"}
        and args["city"] in ("Paris", "Rome")
        and type(args["days"]) is int
        and 1 <= args["days"] <= 7
    )


@pytest.mark.parametrize("parallel", [False, True])
def test_forced_calls_from_a_random_model_are_declared_functions_with_valid_arguments(model, tokenizer, parallel):
    engine = InferenceEngine(model, tokenizer, max_batch_size=16)
    grammar = tool_call_grammar([WEATHER, CLOCK], parallel=parallel)
    params = [SamplingParams(max_tokens=200, temperature=1.0, seed=i, structured_output=grammar) for i in range(24)]
    out = engine.generate(["the cat"] * 24, params)
    for completion in out:
        content, calls = split_tool_calls(completion.text)
        finished = completion.finish_reason == "stop"
        assert content is None or not finished, completion.text
        if finished:
            assert calls and all(_valid(c) for c in calls), completion.text
            assert parallel or len(calls) == 1
    assert sum(c.finish_reason == "stop" for c in out) >= 20
    if not parallel:
        assert {c.name for o in out for c in split_tool_calls(o.text)[1]} == {"get_weather", "get_time"}
