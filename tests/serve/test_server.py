"""The real server (one per session, see conftest.py) driven by the official openai and anthropic
clients and by raw HTTP. Outputs are checked against the same engine run offline in this process.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import anthropic
import httpx
import openai
import pytest

from astrai.core.auto import AutoModel
from astrai.core.engine import InferenceEngine, SamplingParams
from astrai.core.tokenizer import AutoTokenizer

WORDS = ["fox", "dog", "天气", "机器", "hello", "world", "12345", "language", "公园", "model"]


@pytest.fixture(scope="module")
def offline(server):
    """The engine the server runs, run here directly: the reference for every output."""
    tokenizer = AutoTokenizer.from_pretrained(server.model_dir)
    return InferenceEngine(AutoModel.from_pretrained(server.model_dir), tokenizer, max_batch_size=32)


def chat_ids(engine, messages):
    return engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0)


@pytest.fixture(scope="module")
def aclient(server):
    return anthropic.Anthropic(base_url=server.url, api_key=server.api_key, max_retries=0)


def wait_idle(server, timeout: float = 60) -> dict:
    """Engine stats once nothing has run for a while (bounded wait; not a timing assertion).

    stats() is read while the engine thread steps, so one reading can be torn; idle means
    five readings in a row with nothing running and no new tokens.
    """
    deadline = time.monotonic() + timeout
    calm, last = 0, None
    while calm < 5 and time.monotonic() < deadline:
        stats = server.stats()["engine"]
        idle = stats["running"] == 0 and stats["waiting"] == 0
        calm = calm + 1 if idle and last is not None and stats["generated_tokens"] == last else 0
        last = stats["generated_tokens"]
        time.sleep(0.05)
    return stats


def pick_stop(text: str) -> str:
    """Two printable ASCII characters from the second half of a greedy answer, to stop on."""
    for i in range(len(text) // 3, len(text) - 1):
        if text[i : i + 2].isascii() and text[i : i + 2].isprintable():
            return text[i : i + 2]
    raise AssertionError(f"no stop string to pick in {text!r}; use another prompt")


# -- basics ----------------------------------------------------------------------------------
def test_health_stats_and_startup_log(server):
    assert httpx.get(server.url + "/health").text == "ok"
    stats = server.stats()
    assert stats["model"] == server.model
    assert stats["engine"]["pages_total"] > 0 and stats["max_model_len"] == server.max_len
    log = server.log.read_text()
    assert "KV cache:" in log and f"http://127.0.0.1:{server.port}" in log and "tiny-model" in log


def test_models_in_both_protocols(client, aclient, server):
    assert [m.id for m in client.models.list().data] == [server.model]
    assert [m.id for m in aclient.models.list().data] == [server.model]


# -- OpenAI ----------------------------------------------------------------------------------
def test_chat_greedy_equals_offline_engine(client, offline, server):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "今天天气很好"}]
    ref = offline.generate([chat_ids(offline, messages)], SamplingParams(temperature=0, max_tokens=20))[0]
    r = client.chat.completions.create(model=server.model, messages=messages, max_tokens=20, temperature=0)
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.id.startswith("chatcmpl-") and r.model == server.model and r.object == "chat.completion"


def test_chat_stream_with_usage(client, offline, server):
    messages = [{"role": "user", "content": "hello world"}]
    ref = offline.generate(
        [chat_ids(offline, messages)], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    )[0]
    chunks = list(
        client.chat.completions.create(
            model=server.model,
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == ref.text and finish == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_logprobs_equal_offline(client, offline, server):
    messages = [{"role": "user", "content": "fox"}]
    ref = offline.generate([chat_ids(offline, messages)], SamplingParams(temperature=0, max_tokens=5, logprobs=2))[0]
    r = client.chat.completions.create(
        model=server.model, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    got = r.choices[0].logprobs.content
    assert len(got) == len(ref.samples[0].logprobs)
    for entry, want in zip(got, ref.samples[0].logprobs):
        assert entry.logprob == pytest.approx(want.logprob, abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx([lp for _, lp in want.top], abs=1e-4)
        assert entry.token == offline.tokenizer.decode([want.token_id])


def test_seeded_samples_reproduce_and_match_offline(client, offline, server):
    messages = [{"role": "user", "content": "机器学习"}]
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=7, n=2)
    ref = offline.generate([chat_ids(offline, messages)], params)[0]
    kwargs = dict(model=server.model, messages=messages, max_tokens=10, temperature=1.0, top_p=0.9, seed=7, n=2)
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    texts = [c.message.content for c in a.choices]
    assert texts == [c.message.content for c in b.choices] == [s.text for s in ref.samples]
    assert a.usage.completion_tokens == sum(len(s.token_ids) for s in ref.samples)


def test_stop_string_ends_the_choice(client, offline, server):
    messages = [{"role": "user", "content": "language model"}]
    full = offline.generate(
        [chat_ids(offline, messages)], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    )[0].text
    stop = pick_stop(full)
    r = client.chat.completions.create(
        model=server.model,
        messages=messages,
        max_tokens=30,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop" and choice.stop_reason == stop
    assert choice.message.content == full[: full.index(stop)]


def test_legacy_completions_token_prompt_and_echo(client, offline, server):
    ids = offline.tokenizer.encode("The quick brown", add_special_tokens=True)
    ref = offline.generate([ids], SamplingParams(temperature=0, max_tokens=8))[0]
    r = client.completions.create(model=server.model, prompt=ids, max_tokens=8, temperature=0)
    assert r.choices[0].text == ref.text and r.object == "text_completion"
    r = client.completions.create(model=server.model, prompt="The quick brown", max_tokens=8, temperature=0, echo=True)
    assert r.choices[0].text == "The quick brown" + ref.text
    streamed = client.completions.create(model=server.model, prompt=ids, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == ref.text


def test_concurrent_requests_share_the_engine_and_equal_offline(server, offline):
    """32 requests at once, half streamed: outputs equal offline greedy generation, and the
    engine ran them together (far fewer steps than tokens), not one after the other."""
    prompts = [[{"role": "user", "content": f"{WORDS[i % 10]} {WORDS[i * 3 % 10]} #{i}"}] for i in range(32)]
    refs = offline.generate([chat_ids(offline, p) for p in prompts], SamplingParams(temperature=0, max_tokens=24))
    before = wait_idle(server)

    async def one(c, i):
        kwargs = dict(model=server.model, messages=prompts[i], max_tokens=24, temperature=0)
        if i % 2:
            r = await c.chat.completions.create(**kwargs)
            return r.choices[0].message.content, r.choices[0].finish_reason
        text, finish = "", None
        async for chunk in await c.chat.completions.create(**kwargs, stream=True):
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def run_all():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0) as c:
            return await asyncio.gather(*(one(c, i) for i in range(32)))

    outputs = asyncio.run(run_all())
    assert outputs == [(r.text, r.finish_reason) for r in refs]
    after = wait_idle(server)
    tokens = after["generated_tokens"] - before["generated_tokens"]
    steps = after["steps"] - before["steps"]
    assert tokens == sum(len(r.token_ids) for r in refs)
    assert steps < tokens / 4, f"{steps} engine steps for {tokens} tokens: requests were not batched"


def test_concurrent_streams_of_both_protocols_equal_full_answers(server, offline):
    """Streams that run together (their replies share the worker's batched messages) still join
    to the offline answers: OpenAI completions with n=2 per choice index, Anthropic messages,
    with usage counted right."""
    prompts = [[{"role": "user", "content": f"{WORDS[i * 7 % 10]} {WORDS[i % 10]} ~{i}"}] for i in range(12)]
    params = SamplingParams(temperature=1.0, max_tokens=20, seed=11, n=2, ignore_eos=True)
    refs = offline.generate([chat_ids(offline, p) for p in prompts[:6]], params)
    refs += offline.generate([chat_ids(offline, p) for p in prompts[6:]], SamplingParams(temperature=0, max_tokens=20))

    async def openai_stream(c, i):
        texts, finish, usage = ["", ""], [None, None], None
        stream = await c.completions.create(
            model=server.model,
            prompt=chat_ids(offline, prompts[i]),
            max_tokens=20,
            temperature=1.0,
            seed=11,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            for choice in chunk.choices:
                texts[choice.index] += choice.text
                finish[choice.index] = choice.finish_reason or finish[choice.index]
            usage = chunk.usage or usage
        return texts, finish, (usage.prompt_tokens, usage.completion_tokens)

    async def anthropic_stream(c, i):
        async with c.messages.stream(
            model=server.model, max_tokens=20, messages=prompts[i], extra_body={"temperature": 0}
        ) as stream:
            text = "".join([e.delta.text async for e in stream if e.type == "content_block_delta"])
            final = await stream.get_final_message()
        return text, final.content[0].text, (final.usage.input_tokens, final.usage.output_tokens)

    async def run_all():
        async with (
            openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0) as oc,
            anthropic.AsyncAnthropic(base_url=server.url, api_key=server.api_key, max_retries=0) as ac,
        ):
            return await asyncio.gather(
                *(openai_stream(oc, i) for i in range(6)), *(anthropic_stream(ac, i) for i in range(6, 12))
            )

    outputs = asyncio.run(run_all())
    for ref, (texts, finish, usage) in zip(refs[:6], outputs[:6]):
        assert texts == [s.text for s in ref.samples] and finish == ["length", "length"]
        assert usage == (len(ref.prompt_token_ids), 40)
    assert sum(len(r.token_ids) for r in refs[6:]) > 30  # the greedy answers are not all empty
    for ref, (streamed, final, usage) in zip(refs[6:], outputs[6:]):
        assert streamed == final == ref.text
        assert usage == (len(ref.prompt_token_ids), len(ref.token_ids))


# -- Anthropic -------------------------------------------------------------------------------
def _anthropic_ref(offline, system, messages, max_tokens):
    ids = chat_ids(offline, [{"role": "system", "content": system}, *messages])
    ref = offline.generate([ids], SamplingParams(temperature=0, max_tokens=max_tokens))[0]
    return ref, {"length": "max_tokens", "stop": "end_turn"}[ref.finish_reason]


def test_anthropic_message_equals_offline(aclient, offline, server):
    messages = [{"role": "user", "content": "你好，世界"}]
    ref, stop_reason = _anthropic_ref(offline, "Be kind.", messages, 16)
    m = aclient.messages.create(
        model=server.model, max_tokens=16, system="Be kind.", messages=messages, extra_body={"temperature": 0}
    )
    assert m.content[0].text == ref.text and m.stop_reason == stop_reason
    assert m.usage.input_tokens == len(ref.prompt_token_ids) and m.usage.output_tokens == len(ref.token_ids)
    assert m.id.startswith("msg_") and m.role == "assistant" and m.model == server.model


def test_anthropic_stream_event_sequence(aclient, offline, server):
    messages = [{"role": "user", "content": "Numbers like 12345"}]
    ref, stop_reason = _anthropic_ref(offline, "Count.", messages, 10)
    with aclient.messages.stream(
        model=server.model, max_tokens=10, system="Count.", messages=messages, extra_body={"temperature": 0}
    ) as stream:
        types = [event.type for event in stream]
        final = stream.get_final_message()
    assert final.content[0].text == ref.text and final.stop_reason == stop_reason
    assert final.usage.output_tokens == len(ref.token_ids)
    raw = [t for t in types if t != "text"]  # the helper adds a "text" event per delta
    assert raw[:2] == ["message_start", "content_block_start"]
    assert raw[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(raw[2:-3]) <= {"content_block_delta"}


def test_anthropic_stop_sequence(aclient, offline, server):
    messages = [{"role": "user", "content": "fox"}]
    full = offline.generate([chat_ids(offline, messages)], SamplingParams(temperature=0, max_tokens=30))[0].text
    stop = pick_stop(full)
    m = aclient.messages.create(
        model=server.model, max_tokens=30, messages=messages, stop_sequences=[stop], extra_body={"temperature": 0}
    )
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop
    assert m.content[0].text == full[: full.index(stop)]


# -- errors ----------------------------------------------------------------------------------
OPENAI_BAD = [
    (b"{not json", "JSON", None),
    (json.dumps({"model": "tiny-serve"}), "'messages' is required", "messages"),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}), "supported roles", "messages[0].role"),
    (
        json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6}),
        "maximum context length",
        "max_tokens",
    ),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": -1}), "'temperature'", "temperature"),
]


@pytest.mark.parametrize("body, needle, param", OPENAI_BAD)
def test_openai_bad_requests_get_openai_errors(server, body, needle, param):
    r = httpx.post(
        server.url + "/v1/chat/completions",
        content=body,
        headers={"Authorization": f"Bearer {server.api_key}", "Content-Type": "application/json"},
    )
    assert r.status_code == 400
    error = r.json()["error"]
    assert needle in error["message"] and error["param"] == param and error["type"] == "invalid_request_error"


def test_openai_client_raises_bad_request(client, server):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "x"}], top_p=5)
    assert "top_p" in str(exc.value)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    "body, needle",
    [
        (b"{not json", "JSON"),
        (json.dumps({"model": "tiny-serve", "max_tokens": 5}), "messages: Field required"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "max_tokens: Field required"),
        (json.dumps({"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}), "'system'"),
        (json.dumps({"max_tokens": 10**6, "messages": [{"role": "user", "content": "x"}]}), "maximum context length"),
    ],
)
def test_anthropic_bad_requests_get_anthropic_errors(server, body, needle):
    r = httpx.post(server.url + "/v1/messages", content=body, headers={"x-api-key": server.api_key})
    assert r.status_code == 400
    data = r.json()
    assert data["type"] == "error" and data["error"]["type"] == "invalid_request_error"
    assert needle in data["error"]["message"]


def test_wrong_or_missing_api_key_is_401(server):
    bad_openai = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        bad_openai.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "x"}])
    assert "Authorization: Bearer" in exc.value.body["message"]
    bad_anthropic = anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as exc:
        bad_anthropic.messages.create(model=server.model, max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert exc.value.body["error"]["type"] == "authentication_error"
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x"})
    assert r.status_code == 401 and "missing" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/health").status_code == 200  # health stays open for probes


# -- disconnects -----------------------------------------------------------------------------
def test_client_disconnect_mid_stream_aborts_the_request(server):
    before = wait_idle(server)
    body = {
        "model": server.model,
        "messages": [{"role": "user", "content": "go on forever"}],
        "max_tokens": 2000,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {server.api_key}"}
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", server.url + "/v1/chat/completions", json=body, headers=headers) as r,
    ):
        chunks = 0
        for line in r.iter_lines():
            chunks += line.startswith("data:")
            if chunks == 4:
                break
    after = wait_idle(server)
    assert after["running"] == 0 and after["pages_used"] == 0
    assert after["generated_tokens"] - before["generated_tokens"] < 2000


def test_client_disconnect_while_waiting_for_a_full_answer_aborts(server):
    before = wait_idle(server)
    body = json.dumps(
        {
            "model": server.model,
            "messages": [{"role": "user", "content": "wait"}],
            "max_tokens": 2000,
            "temperature": 0,
            "ignore_eos": True,
        }
    ).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {server.api_key}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(request)
        deadline = time.monotonic() + 30
        while server.stats()["engine"]["generated_tokens"] == before["generated_tokens"]:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.02)
    after = wait_idle(server)
    assert after["running"] == 0 and after["pages_used"] == 0
    assert after["generated_tokens"] - before["generated_tokens"] < 2000


def test_metrics_are_prometheus_text(server, client):
    client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "x"}], max_tokens=2)
    r = httpx.get(server.url + "/metrics", headers=server.headers)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    values = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values['astrai_requests_total{route="/v1/chat/completions",status="200"}'] >= 1
    assert values["astrai_engine_pages_total"] > 0
    assert values["astrai_generation_tokens_total"] >= 2
    assert values["astrai_request_duration_seconds_count"] >= 1
