"""The protocol layer without a server: request validation, prompt building, response shapes.

Error tests check the status, the field the error names and that the message says what to do;
success tests compare prompt ids against the tokenizer's own chat template rendering.
"""

from __future__ import annotations

import json

import pytest

from astrai.core.tokenizer import AutoTokenizer
from astrai.serve import anthropic_protocol as anth
from astrai.serve import openai_protocol as oai
from astrai.serve.errors import APIError, anthropic_error_body, openai_error_body
from astrai.serve.generation import Accumulator, ModelInfo, merge_events
from astrai.serve.request_fields import parse_json_object

CTX = 64


@pytest.fixture(scope="module")
def info(model_dir) -> ModelInfo:
    return ModelInfo("tiny", AutoTokenizer.from_pretrained(model_dir), max_model_len=CTX, max_batch_size=8)


def chat(**body):
    return {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], **body}


def event(index=0, text="", token_ids=(), finish_reason=None, stop_reason=None, logprobs=None, prompt_tokens=5):
    return {
        "index": index,
        "text": text,
        "token_ids": list(token_ids),
        "logprobs": logprobs,
        "finish_reason": finish_reason,
        "stop_reason": stop_reason,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 0,
    }


def error_of(fn, *args) -> APIError:
    with pytest.raises(APIError) as exc:
        fn(*args)
    return exc.value


# -- OpenAI chat -----------------------------------------------------------------------------
def test_chat_prompt_is_the_chat_template_with_generation_prompt(info):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "你好"}, {"type": "text", "text": " there"}]},
    ]
    gen, options = oai.parse_chat(
        {"messages": messages, "max_tokens": 7, "temperature": 0, "top_k": 5, "stop": "x", "seed": 3}, info
    )
    expected = info.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好 there"}],
        add_generation_prompt=True,
    )
    assert gen.prompt_ids == expected
    assert gen.params["max_tokens"] == 7 and gen.params["temperature"] == 0 and gen.params["top_k"] == 5
    assert gen.params["stop"] == ["x"] and gen.params["seed"] == 3 and gen.params["logprobs"] is None
    assert options == {"stream": False, "include_usage": False, "logprobs": None, "tools": None}


def test_chat_developer_role_is_a_system_message(info):
    a, _ = oai.parse_chat(chat(messages=[{"role": "developer", "content": "Rules"}]), info)
    b, _ = oai.parse_chat(chat(messages=[{"role": "system", "content": "Rules"}]), info)
    assert a.prompt_ids == b.prompt_ids


def test_chat_default_max_tokens_fills_the_context(info):
    gen, _ = oai.parse_chat(chat(), info)
    assert gen.params["max_tokens"] == CTX - len(gen.prompt_ids)


def test_chat_max_completion_tokens_wins_over_max_tokens(info):
    gen, _ = oai.parse_chat(chat(max_tokens=3, max_completion_tokens=5), info)
    assert gen.params["max_tokens"] == 5


def test_chat_logprobs_and_usage_options(info):
    gen, options = oai.parse_chat(
        chat(logprobs=True, top_logprobs=3, stream=True, stream_options={"include_usage": True}), info
    )
    assert gen.params["logprobs"] == 3 and gen.stream
    assert options["include_usage"] is True


@pytest.mark.parametrize(
    "body, param, hint",
    [
        ({"model": "tiny"}, "messages", "required"),
        (chat(messages=[]), "messages", "non-empty"),
        (chat(messages="hi"), "messages", "non-empty"),
        (chat(messages=[{"role": "function", "content": "x"}]), "messages[0].role", "supported roles"),
        (chat(messages=[{"role": "user"}]), "messages[0].content", "is required"),
        (chat(messages=[{"role": "user", "content": 3}]), "messages[0].content", "string or a list"),
        (chat(messages=[{"role": "user", "content": "x", "tool_calls": []}]), "messages[0].tool_calls", "assistant"),
        (
            chat(messages=[{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}]),
            "messages[0].tool_calls",
            "JSON text",
        ),
        (
            chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
            "messages[0].content[0]",
            "text only",
        ),
        (chat(temperature=3), "temperature", "at most 2"),
        (chat(temperature=True), "temperature", "number"),
        (chat(temperature="0.5"), "temperature", "number"),
        (chat(top_p=0), "top_p", "greater than 0"),
        (chat(presence_penalty=-2.5), "presence_penalty", "at least -2"),
        (chat(n=0), "n", "at least 1"),
        (chat(n=9), "n", "--max-batch-size"),
        (chat(max_tokens=0), "max_tokens", "at least 1"),
        (chat(max_tokens=CTX), "max_tokens", "at most"),
        (chat(max_completion_tokens=10_000), "max_completion_tokens", "maximum context length"),
        (chat(messages=[{"role": "user", "content": "word " * 200}]), "messages", "maximum context length"),
        (chat(stop=["", "x"]), "stop", "non-empty"),
        (chat(stop=[1]), "stop", "strings"),
        (chat(top_logprobs=2), "top_logprobs", "logprobs"),
        (chat(logprobs=True, top_logprobs=21), "top_logprobs", "between 0 and 20"),
        (chat(stream_options={"include_usage": True}), "stream_options", "stream"),
        (chat(repetition_penalty=0), "repetition_penalty", "greater than 0"),
        (chat(min_p=1.5), "min_p", "at most 1"),
        (chat(seed=-1), "seed", "integer"),
        (chat(stop_token_ids=[10**6]), "stop_token_ids", "vocabulary"),
        (chat(tools=[{"type": "function"}]), "tools", '"function": {"name"'),
        (chat(tools=[{"type": "function", "function": {"name": "a b"}}]), "tools", "letters, digits"),
        (chat(tools=[]), "tools", "list of"),
        (chat(tool_choice="always"), "tool_choice", '"required"'),
        (chat(tool_choice="required"), "tool_choice", "declares no tools"),
        (
            chat(
                tools=[{"type": "function", "function": {"name": "f"}}],
                tool_choice={"type": "function", "function": {"name": "g"}},
            ),
            "tool_choice",
            "not among",
        ),
        (
            chat(
                tools=[{"type": "function", "function": {"name": "f"}}],
                tool_choice="required",
                response_format={"type": "json_object"},
            ),
            "response_format",
            "forced",
        ),
        (chat(parallel_tool_calls="yes"), "parallel_tool_calls", "true or false"),
        (chat(functions=[{"name": "f"}]), "functions", "send `tools`"),
        (chat(response_format={"type": "yaml"}), "response_format", 'must be {"type": "text"}'),
        (chat(response_format={"type": "json_schema"}), "response_format", "json_schema"),
    ],
)
def test_chat_rejects_bad_fields_naming_them(info, body, param, hint):
    err = error_of(oai.parse_chat, body, info)
    assert err.status == 400
    assert err.param == param
    assert hint in err.message


def test_unknown_model_is_404_naming_the_served_one(info):
    err = error_of(oai.parse_chat, chat(model="gpt-4"), info)
    assert err.status == 404 and "'tiny'" in err.message and err.code == "model_not_found"


def test_malformed_json_and_non_objects_are_400():
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        err = error_of(parse_json_object, raw)
        assert err.status == 400 and "JSON" in err.message


def test_error_bodies_have_each_protocols_shape():
    err = APIError(400, "bad 'temperature'", param="temperature")
    assert openai_error_body(err) == {
        "error": {"message": "bad 'temperature'", "type": "invalid_request_error", "param": "temperature", "code": None}
    }
    assert anthropic_error_body(err) == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "bad 'temperature'"},
    }
    assert (
        anthropic_error_body(APIError(401, "key", type="authentication_error"))["error"]["type"]
        == "authentication_error"
    )


# -- OpenAI legacy completions ---------------------------------------------------------------
def test_completion_string_prompt_gets_bos_token_list_is_kept(info):
    gen, options = oai.parse_completion({"prompt": "Hello world"}, info)
    assert gen.prompt_ids == info.tokenizer.encode("Hello world", add_special_tokens=True)
    assert gen.prompt_ids[0] == info.tokenizer.bos_token_id
    assert gen.params["max_tokens"] == 16  # OpenAI's legacy default
    ids = info.tokenizer.encode("Hello")
    gen, _ = oai.parse_completion({"prompt": ids, "max_tokens": 4, "echo": True}, info)
    assert gen.prompt_ids == ids
    gen, options = oai.parse_completion({"prompt": [ids], "echo": True}, info)
    assert gen.prompt_ids == ids and options["echo"] == info.tokenizer.decode(ids)


@pytest.mark.parametrize(
    "body, param",
    [
        ({}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": [1, -2]}, "prompt"),
        ({"prompt": [10**6]}, "prompt"),
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": "x", "logprobs": 6}, "logprobs"),
        ({"prompt": "x", "logprobs": 1, "echo": True, "stream": True}, "echo"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
    ],
)
def test_completion_rejects_bad_fields(info, body, param):
    err = error_of(oai.parse_completion, body, info)
    assert err.status == 400 and err.param == param


# -- Anthropic -------------------------------------------------------------------------------
def test_messages_prompt_has_system_and_prefill(info):
    body = {
        "model": "tiny",
        "max_tokens": 5,
        "system": [{"type": "text", "text": "Be brief."}],
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure,"}],
        "stop_sequences": ["\n\n"],
        "temperature": 0.5,
        "top_k": 4,
        "ignore_eos": True,
    }
    gen, options = anth.parse_messages(body, info)
    text = info.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert gen.prompt_ids == info.tokenizer.encode(text + "Sure,")
    assert gen.params == {
        "temperature": 0.5,
        "top_p": 1.0,
        "top_k": 4,
        "stop": ["\n\n"],
        "max_tokens": 5,
        "ignore_eos": True,
    }
    assert options == {"stream": False, "stop": ["\n\n"], "tools": None}


HI = [{"role": "user", "content": "Hi"}]
F = [{"name": "f", "input_schema": {"type": "object"}}]
USE = {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}


@pytest.mark.parametrize(
    "body, hint",
    [
        ({"messages": [{"role": "user", "content": "Hi"}]}, "max_tokens: Field required"),
        ({"max_tokens": 5}, "messages: Field required"),
        ({"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, "top-level 'system'"),
        ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image"}]}]}, "'image' is not supported"),
        ({"max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}], "temperature": 1.5}, "'temperature'"),
        ({"max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}], "ignore_eos": "yes"}, "'ignore_eos'"),
        ({"max_tokens": 10_000, "messages": [{"role": "user", "content": "Hi"}]}, "maximum context length"),
        ({"max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}], "stop_sequences": "x y"}, None),
        ({"max_tokens": 5, "messages": HI, "tools": [{"name": "f"}]}, "input_schema"),
        ({"max_tokens": 5, "messages": HI, "tools": [{"name": "a b", "input_schema": {}}]}, "letters, digits"),
        ({"max_tokens": 5, "messages": HI, "tool_choice": {"type": "any"}}, "declares no tools"),
        ({"max_tokens": 5, "messages": HI, "tools": F, "tool_choice": {"type": "tool"}}, 'needs the tool\'s "name"'),
        ({"max_tokens": 5, "messages": HI, "tools": F, "tool_choice": {"type": "tool", "name": "g"}}, "not among"),
        ({"max_tokens": 5, "messages": HI, "tools": F, "tool_choice": {"type": "sometimes"}}, "tool_choice: must be"),
        (
            {"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "tool_result"}]}]},
            "messages.0.content.0.tool_use_id",
        ),
        (
            {"max_tokens": 5, "messages": [*HI, {"role": "assistant", "content": [USE]}]},
            "send their tool_result blocks",
        ),
        ({"max_tokens": 5, "messages": [{"role": "user", "content": [USE]}]}, "belong in assistant messages"),
    ],
)
def test_messages_rejects_bad_requests(info, body, hint):
    if hint is None:  # a single string is accepted as one stop sequence
        gen, _ = anth.parse_messages(body, info)
        assert gen.params["stop"] == ["x y"]
        return
    err = error_of(anth.parse_messages, body, info)
    assert err.status == 400 and hint in err.message


@pytest.mark.parametrize(
    "finish, stop_reason, expected",
    [
        ("length", None, ("max_tokens", None)),
        ("stop", "END", ("stop_sequence", "END")),
        ("stop", None, ("end_turn", None)),
        ("stop", 7, ("end_turn", None)),
    ],
)
def test_anthropic_stop_reasons(finish, stop_reason, expected):
    out = anth.stop_fields(finish, stop_reason, ["END"])
    assert (out["stop_reason"], out["stop_sequence"]) == expected


# -- response shaping ------------------------------------------------------------------------
def test_accumulator_folds_interleaved_samples():
    acc = Accumulator(2)
    acc.add(event(0, "He", [1, 2]))
    acc.add(event(1, "Yo", [3]))
    acc.add(event(0, "llo", [4], finish_reason="stop"))
    assert not acc.done
    acc.add(event(1, "", [5], finish_reason="length"))
    assert acc.done and [c.text for c in acc.choices] == ["Hello", "Yo"]
    assert acc.usage() == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}


def test_merge_events_joins_each_samples_deltas_in_order():
    lp = lambda i: [{"id": i, "logprob": -1.0, "top": []}]  # noqa: E731
    events = [
        event(0, "a", [1], logprobs=lp(1)),
        event(1, "x", [7], logprobs=lp(7)),
        event(0, "b", [2], logprobs=lp(2)),
        event(0, "", [3], finish_reason="stop", logprobs=lp(3)),
    ]
    merged = merge_events(events)
    assert [m["index"] for m in merged] == [0, 1]
    assert merged[0]["text"] == "ab" and merged[0]["token_ids"] == [1, 2, 3]
    assert [e["id"] for e in merged[0]["logprobs"]] == [1, 2, 3] and merged[0]["finish_reason"] == "stop"
    assert merged[1]["token_ids"] == [7] and merged[1]["finish_reason"] is None
    assert events[0]["token_ids"] == [1]  # inputs untouched
    folded, direct = Accumulator(2), Accumulator(2)
    for e in merged:
        folded.add(e)
    for e in events:
        direct.add(e)
    assert [(c.text, c.token_ids, c.finish_reason) for c in folded.choices] == [
        (c.text, c.token_ids, c.finish_reason) for c in direct.choices
    ]


def test_chat_stream_chunk_order_ids_and_usage(info):
    stream = oai.ChatStream("chatcmpl-1", info, 1, {"include_usage": True, "logprobs": None})
    chunks = (
        stream.start()
        + stream.events(
            [
                event(text="Hi", token_ids=[1]),
                event(token_ids=[2]),
                event(text="!", token_ids=[3], finish_reason="length"),
            ]
        )
        + stream.end()
    )
    assert {c["id"] for c in chunks} == {"chatcmpl-1"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]]
    assert deltas == ["Hi", "!"]  # the text-less token event is not sent
    assert [c["choices"][0]["finish_reason"] for c in chunks[1:-1]] == [None, "length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert all(c["usage"] is None for c in chunks[:-1])
    json.dumps(chunks)


def test_chat_logprobs_shape(info):
    tok = info.tokenizer
    a, b = tok.encode("Hello")[:1][0], tok.encode(" world")[0]
    out = oai.chat_logprobs(tok, [{"id": a, "logprob": -0.5, "top": [[a, -0.5], [b, -1.5]]}])
    entry = out["content"][0]
    assert entry["token"] == tok.decode([a]) and entry["logprob"] == -0.5
    assert bytes(entry["bytes"]).decode() == tok.decode([a])
    assert [t["logprob"] for t in entry["top_logprobs"]] == [-0.5, -1.5]


def test_anthropic_stream_event_sequence(info):
    stream = anth.MessageStream("msg_1", info, 4, {"stop": ["END"]})
    items = stream.start() + stream.events(
        [event(text="Hi", token_ids=[1]), event(text="", token_ids=[2], finish_reason="stop", stop_reason="END")]
    )
    items += stream.end()
    assert [name for name, _ in items] == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(data["type"] == name for name, data in items)
    assert items[0][1]["message"]["usage"] == {"input_tokens": 4, "output_tokens": 0}
    delta = items[5][1]
    assert delta["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}
    assert delta["usage"] == {"output_tokens": 2}
    assert delta["weights_version"] == 0


def test_anthropic_stream_with_tools_puts_each_call_in_its_own_tool_use_block(info):
    stream = anth.MessageStream("msg_1", info, 4, {"stop": [], "tools": True})
    text = 'Checking. <tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    items = stream.start() + stream.events([event(text=text[:15]), event(text=text[15:], finish_reason="stop")])
    items += stream.end()
    blocks = [(d["index"], d["content_block"]["type"]) for n, d in items if n == "content_block_start"]
    assert blocks == [(0, "text"), (1, "tool_use")]
    json_deltas = [d["delta"]["partial_json"] for n, d in items if d.get("delta", {}).get("type") == "input_json_delta"]
    assert json_deltas == ['{"x": 1}']
    assert [d["index"] for n, d in items if n == "content_block_stop"] == [0, 1]
    assert items[-2][1]["delta"]["stop_reason"] == "tool_use"


@pytest.mark.parametrize("text", ["a\u2028b", "c\u2029d", "e\x85f", '中文\n\r\t"x'])
def test_sse_events_stay_one_line_for_any_line_splitter(text):
    """A generated token can be U+2028 / U+2029 / NEL: str.splitlines() (httpx's aiter_lines)
    breaks lines there, so a raw one would cut the event's data line in two."""
    from astrai.serve.server import _sse_anthropic, _sse_openai

    for event, prefix in (
        (_sse_openai({"text": text}), "data: "),
        (_sse_anthropic(("delta", {"text": text})), "event: delta"),
    ):
        lines = [line for line in event.splitlines() if line]
        assert lines[-1].startswith("data: ") and lines[0].startswith(prefix)
        assert json.loads(lines[-1][6:])["text"] == text
    assert "中文" in _sse_openai({"text": "中文"})  # Chinese stays readable, not \\u-escaped


# -- request bodies and the fields each route accepts ----------------------------------------
@pytest.mark.parametrize(
    "parse, body, model, ignored",
    [
        (oai.parse_chat, chat(max_tokens=3), oai.ChatCompletionRequest, oai.IGNORED_CHAT),
        (oai.parse_completion, {"prompt": "Hello", "max_tokens": 3}, oai.CompletionRequest, oai.IGNORED_COMPLETION),
        (
            anth.parse_messages,
            {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
            anth.MessagesRequest,
            anth.IGNORED,
        ),
    ],
)
def test_each_routes_accepted_fields_are_its_models_and_ignored_ones_change_nothing(info, parse, body, model, ignored):
    """The accepted list is what strict mode lets through: the request model's fields. A field
    we accept and ignore on purpose takes any value and leaves the generation as it was."""
    accepted = {oai.parse_chat: oai.CHAT_FIELDS, oai.parse_completion: oai.COMPLETION_FIELDS}.get(
        parse, anth.MESSAGE_FIELDS
    )
    assert accepted == set(model.model_fields) and set(ignored) <= accepted
    plain, plain_options = parse(body, info)
    for name in ignored:
        gen, options = parse({**body, name: {"any": ["value", 1]}}, info)
        assert (gen, options) == (plain, plain_options), name


def test_anthropic_refuses_openais_n_and_seed_and_openai_takes_them():
    assert {"n", "seed"} <= oai.CHAT_FIELDS and {"n", "seed"} <= oai.COMPLETION_FIELDS
    assert not {"n", "seed"} & anth.MESSAGE_FIELDS


def test_unknown_field_errors_use_each_protocols_wording_and_suggest_a_near_miss():
    err = oai.unknown_field("max_token", oai.CHAT_FIELDS)
    assert err.status == 400 and err.param == "max_token"
    assert err.message.startswith("Unrecognized request argument supplied: max_token (did you mean 'max_tokens'?)")
    err = anth.unknown_field("stop_sequence", anth.MESSAGE_FIELDS)
    assert err.message.startswith("stop_sequence: Extra inputs are not permitted (did you mean 'stop_sequences'?)")
    err = oai.unknown_field("q" * 10_000, oai.CHAT_FIELDS)
    assert len(err.message) < 300 and "did you mean" not in err.message


@pytest.mark.parametrize(
    "raw, param",
    [
        (b'{"messages": [{"role": "user", "content": "h\\ud800i"}]}', "messages[0].content"),
        (b'{"prompt": ["a", "\\udc00"]}', "prompt[1]"),
        (b'{"messages": [{"h\\ud800": 1}]}', "messages[0]"),
        (b'{"\\ud800": 1}', None),
    ],
)
def test_lone_surrogates_in_values_and_keys_are_refused_with_their_path(raw, param):
    err = error_of(parse_json_object, raw)
    assert err.status == 400 and err.param == param and "lone surrogate" in err.message
    assert param is None or f"'{param}'" in err.message


def test_surrogate_pairs_and_other_unicode_pass():
    body = parse_json_object('{"a": "\\ud83d\\ude00 你好 \\u00e9"}'.encode())
    assert body == {"a": "\U0001f600 你好 é"}


def test_nesting_is_capped_whether_or_not_the_decoder_recurses_too_deep():
    from astrai.serve.request_fields import MAX_DEPTH

    def nested(depth: int) -> bytes:  # the object is level 1, each list one more
        return ('{"a": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}").encode()

    assert parse_json_object(nested(MAX_DEPTH))
    for depth in (MAX_DEPTH + 1, 500, 100_000):  # 100,000 levels: json's RecursionError
        err = error_of(parse_json_object, nested(depth))
        assert err.status == 400 and f"more than {MAX_DEPTH} levels deep" in err.message


@pytest.mark.parametrize(
    "raw, offset", [(b'{"a": "\xff"}', 7), (b'{"a": "\xed\xa0\x80"}', 7), (b'{"a": "\xe4\xbd"}', 7)]
)
def test_invalid_utf8_is_refused_with_its_offset(raw, offset):
    err = error_of(parse_json_object, raw)
    assert err.status == 400 and "not valid UTF-8" in err.message and f"offset {offset}" in err.message


@pytest.mark.parametrize(
    "raw, needle",
    [
        (b'{"max_tokens": ' + b"9" * 5000 + b"}", "4300 digits"),
        (b'{"temperature": NaN}', "NaN is not a JSON number"),
        (b'{"top_p": -Infinity}', "-Infinity is not a JSON number"),
    ],
)
def test_numbers_json_cannot_carry_are_refused(raw, needle):
    err = error_of(parse_json_object, raw)
    assert err.status == 400 and needle in err.message


def test_tools_for_a_template_that_ignores_them_are_refused_naming_tools(model_dir):
    plain = AutoTokenizer.from_pretrained(model_dir)
    plain.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    info = ModelInfo("tiny", plain, max_model_len=CTX, max_batch_size=8)
    err = error_of(oai.parse_chat, chat(tools=[{"type": "function", "function": {"name": "f"}}]), info)
    assert err.status == 400 and err.param == "tools" and "does not render tools" in err.message
    gen, _ = oai.parse_chat(chat(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="none"), info)
    assert gen.prompt_ids == plain.encode("Hello")  # with tool_choice "none" the tools are not shown at all


def test_streamed_calls_arrive_as_indexed_tool_call_deltas_and_finish_as_tool_calls(info):
    options = {"stream": True, "include_usage": False, "logprobs": None, "tools": True}  # parse_chat's, with tools
    stream = oai.ChatStream("c1", info, 1, options)
    text = 'ok <tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    chunks = []
    for k in range(0, len(text), 7):
        chunks += stream.events([event(0, text[k : k + 7])])
    chunks += stream.events([event(0, "", finish_reason="stop")])
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("content", "") for d in deltas) == "ok"
    calls = [call for d in deltas for call in d.get("tool_calls", [])]
    assert [(c["index"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        (0, "f", '{"x": 1}'),
        (1, "f", "{}"),
    ]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
