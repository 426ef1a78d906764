"""Security and bad input against the real server: the API key on every route, API docs, the
request size limit, unknown fields, text that is not Unicode, deep JSON, and a huge prompt that
must not stall the event loop.

`server` (conftest.py) runs with the defaults and a key; `lenient` adds --docs,
--max-request-bytes 8MiB and --no-strict-fields.
"""

from __future__ import annotations

import json
import statistics
import threading
import time

import anthropic
import httpx
import openai
import pytest
from conftest import start_cpu_server

# "/" is the static chat page, open like /health (test_chat_page.py checks it holds no data).
GET_ROUTES = ["/stats", "/metrics", "/v1/models", "/info", "/docs", "/redoc", "/openapi.json", "/no-such-route"]
POST_ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/messages"]
CHAT = {"model": "tiny-serve", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
COMPLETION = {"model": "tiny-serve", "prompt": "hello", "max_tokens": 2}
MESSAGE = {"model": "tiny-serve", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
BODIES = {"/v1/chat/completions": CHAT, "/v1/completions": COMPLETION, "/v1/messages": MESSAGE}


@pytest.fixture(scope="module")
def lenient(launch, model_dir, tmp_path_factory):
    """A second server with a key, --docs, an 8 MiB body limit and --no-strict-fields."""
    log = tmp_path_factory.mktemp("serve-lenient") / "server.log"
    args = ("--api-key", launch.api_key, "--docs", "--max-request-bytes", "8MiB", "--no-strict-fields")
    srv = start_cpu_server(model_dir, log, *args)
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


def keyed(server, **extra) -> dict[str, str]:
    return {**server.headers, "Content-Type": "application/json", **extra}


def openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    return r.json()["error"]


def anthropic_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    data = r.json()
    assert data["type"] == "error"
    return data["error"]


# -- the API key -----------------------------------------------------------------------------
def test_every_route_but_health_and_the_chat_page_refuses_a_missing_key(server):
    for path in GET_ROUTES:
        error = openai_error(httpx.get(server.url + path), 401)
        assert "API key missing" in error["message"] and "Authorization: Bearer" in error["message"], path
        assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
    for path in POST_ROUTES:
        r = httpx.post(server.url + path, json=BODIES[path])
        message = (anthropic_error(r, 401) if path == "/v1/messages" else openai_error(r, 401))["message"]
        assert "API key missing" in message, path
    error = anthropic_error(httpx.get(server.url + "/v1/models", headers={"anthropic-version": "2023-06-01"}), 401)
    assert error["type"] == "authentication_error" and "x-api-key" in error["message"]
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.text == "ok"


def test_every_route_refuses_a_wrong_key_in_either_header(server):
    for headers in ({"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"}, {"Authorization": server.api_key}):
        for path in GET_ROUTES:
            error = openai_error(httpx.get(server.url + path, headers=headers), 401)
            assert "API key invalid" in error["message"], (path, headers)


def test_the_key_opens_our_routes_and_litserves(server):
    for headers in ({"Authorization": f"Bearer {server.api_key}"}, {"x-api-key": server.api_key}):
        assert httpx.get(server.url + "/stats", headers=headers).json()["model"] == server.model
        assert "astrai_engine_pages_total" in httpx.get(server.url + "/metrics", headers=headers).text
        assert httpx.get(server.url + "/info", headers=headers).json()["model"]["model"] == server.model
        assert httpx.get(server.url + "/v1/models", headers=headers).status_code == 200


def test_the_official_clients_see_authentication_errors_on_every_route(server):
    bad_openai = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_openai.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad_openai.completions.create(model=server.model, prompt="x", max_tokens=2)
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0).models.list()


def test_refused_requests_are_counted_per_generation_route(server):
    httpx.post(server.url + "/v1/completions", json=COMPLETION)
    httpx.get(server.url + "/no-such-route")  # not a route: no label for it
    text = httpx.get(server.url + "/metrics", headers=server.headers).text
    assert 'astrai_requests_total{route="/v1/completions",status="401"}' in text
    assert "no-such-route" not in text


# -- API docs --------------------------------------------------------------------------------
def test_docs_are_off_by_default_when_a_key_is_set(server):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(server.url + path, headers=server.headers).status_code == 404, path
    assert "Swagger UI" not in server.log.read_text()


def test_docs_turned_on_with_a_key_need_the_key_too(lenient):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(lenient.url + path).status_code == 401, path
    schema = httpx.get(lenient.url + "/openapi.json", headers=lenient.headers).json()
    assert {"/v1/chat/completions", "/v1/messages", "/stats"} <= set(schema["paths"])
    docs = httpx.get(lenient.url + "/docs", headers=lenient.headers)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


# -- request size ----------------------------------------------------------------------------
def _big_chat(size: int) -> bytes:
    body = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * size}]}).encode()
    assert len(body) > size
    return body


def test_a_body_over_the_limit_gets_413_naming_the_limit_and_the_flag(server):
    body = _big_chat(5 * 2**20)
    error = openai_error(httpx.post(server.url + "/v1/chat/completions", content=body, headers=keyed(server)), 413)
    assert "4MiB" in error["message"] and "--max-request-bytes" in error["message"]
    assert error["code"] == "request_too_large"
    r = httpx.post(server.url + "/v1/messages", content=body, headers=keyed(server))
    assert anthropic_error(r, 413)["type"] == "request_too_large"
    ok = httpx.post(server.url + "/v1/chat/completions", content=_big_chat(1000), headers=keyed(server))
    assert ok.status_code == 200  # the connection pool and the server are fine afterwards


def test_a_chunked_body_is_capped_while_it_streams_in(server):
    def chunks(total: int, size: int = 2**16):
        body = _big_chat(total)
        for i in range(0, len(body), size):
            yield body[i : i + size]

    r = httpx.post(server.url + "/v1/chat/completions", content=chunks(5 * 2**20), headers=keyed(server))
    assert "--max-request-bytes" in openai_error(r, 413)["message"]
    assert "Content-Length" not in r.request.headers  # it really was chunked
    r = httpx.post(server.url + "/v1/chat/completions", content=chunks(300, 50), headers=keyed(server))
    assert r.status_code == 200 and r.json()["object"] == "chat.completion", r.text


def test_a_large_body_without_the_key_is_refused_for_the_key(server):
    r = httpx.post(
        server.url + "/v1/chat/completions", content=_big_chat(5 * 2**20), headers={"Content-Type": "application/json"}
    )
    assert "API key missing" in openai_error(r, 401)["message"]


def test_health_stays_fast_while_a_3mb_prompt_is_tokenized(lenient):
    """The prompt (about 2M tokens for this tokenizer) takes seconds to tokenize; /health calls
    made meanwhile must still answer at once. Every call started while the big request was open
    counts; the median judges, so that one slow call on a busy machine does not decide it. A
    blocked event loop shows as few calls (one of them waiting seconds), so their number is
    checked too."""
    words = "fox dog 天气 hello world 12345 language 公园 model "
    prompt = words * (3_000_000 // len(words.encode()))
    body = json.dumps({**CHAT, "messages": [{"role": "user", "content": prompt}]}, ensure_ascii=False).encode()
    assert 2.9e6 < len(body) < 4e6
    result = {}

    def big() -> None:
        result["response"] = httpx.post(
            lenient.url + "/v1/chat/completions", content=body, headers=keyed(lenient), timeout=300
        )

    latencies = []
    with httpx.Client(base_url=lenient.url, timeout=30) as http:
        http.get("/health")  # connect first
        sender = threading.Thread(target=big)
        sender.start()
        while sender.is_alive():  # the big request is still being processed
            start = time.perf_counter()
            assert http.get("/health").status_code == 200
            latencies.append(time.perf_counter() - start)
            time.sleep(0.02)
        sender.join()
    # The whole prompt was tokenized: the answer counts its tokens against the context.
    error = openai_error(result["response"], 400)
    assert "maximum context length" in error["message"] and error["param"] == "messages"
    assert len(latencies) >= 10, f"only {len(latencies)} /health calls while the big request ran: {latencies}"
    assert statistics.median(latencies) < 0.1, f"/health latencies during the big request: {latencies}"


# -- bad input -------------------------------------------------------------------------------
LONE_SURROGATE = [
    (
        "/v1/chat/completions",
        '{"messages": [{"role": "user", "content": "h\\ud800i"}], "max_tokens": 2}',
        "messages[0].content",
    ),
    (
        "/v1/chat/completions",
        '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
        "messages[0].content[0].text",
    ),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "stop": ["a\\ud83d"]}', "stop[0]"),
    ("/v1/completions", '{"prompt": "h\\ud800i", "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"prompt": "hi", "max_tokens": 2, "x\\ud800": 1}', None),
    (
        "/v1/messages",
        '{"system": "h\\ud800i", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}',
        "system",
    ),
    (
        "/v1/messages",
        '{"messages": [{"role": "user", "content": "h\\ud800i"}], "max_tokens": 2}',
        "messages[0].content",
    ),
]


@pytest.mark.parametrize("path, body, field", LONE_SURROGATE)
def test_a_lone_surrogate_anywhere_is_a_400_naming_the_field(server, path, body, field):
    r = httpx.post(server.url + path, content=body.encode(), headers=keyed(server))
    if path == "/v1/messages":
        message = anthropic_error(r, 400)["message"]
    else:
        error = openai_error(r, 400)
        assert error["param"] == field
        message = error["message"]
    assert "lone surrogate" in message and (field is None or f"'{field}'" in message)


def test_a_complete_surrogate_pair_is_text_like_any_other(server):
    body = '{"messages": [{"role": "user", "content": "smile \\ud83d\\ude00"}], "max_tokens": 2}'
    r = httpx.post(server.url + "/v1/chat/completions", content=body.encode(), headers=keyed(server))
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] > 0


@pytest.mark.parametrize("depth", [40, 100_000])
def test_deeply_nested_json_is_a_400_not_a_500(server, depth):
    body = '{"messages": ' + "[" * depth + "]" * depth + ', "max_tokens": 2}'
    for path in POST_ROUTES:
        r = httpx.post(server.url + path, content=body.encode(), headers=keyed(server))
        assert r.status_code == 400, (path, r.text)
        assert "levels deep" in r.text
    assert httpx.get(server.url + "/health").status_code == 200


@pytest.mark.parametrize(
    "raw", [b'{"prompt": "h\xffi", "max_tokens": 2}', b'{"prompt": "h\xed\xa0\x80i", "max_tokens": 2}']
)  # a UTF-8-encoded surrogate
def test_invalid_utf8_is_a_400(server, raw):
    error = openai_error(httpx.post(server.url + "/v1/completions", content=raw, headers=keyed(server)), 400)
    assert "not valid UTF-8" in error["message"] and "offset 13" in error["message"]


@pytest.mark.parametrize(
    "raw",
    [b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", b'{"prompt": "hi", "max_tokens": 2, "temperature": NaN}'],
)
def test_numbers_json_cannot_carry_are_a_400_on_every_route(server, raw):
    for path in POST_ROUTES:
        r = httpx.post(server.url + path, content=raw, headers=keyed(server))
        assert r.status_code == 400 and "JSON requests cannot carry" in r.text, (path, r.text)


# -- unknown fields --------------------------------------------------------------------------
def test_unknown_fields_are_a_400_naming_the_field(server):
    r = httpx.post(server.url + "/v1/chat/completions", json={**CHAT, "max_token": 5}, headers=keyed(server))
    error = openai_error(r, 400)
    assert error["param"] == "max_token"
    assert error["message"].startswith("Unrecognized request argument supplied: max_token (did you mean 'max_tokens'?)")
    assert "--no-strict-fields" in error["message"]
    r = httpx.post(
        server.url + "/v1/completions", json={**COMPLETION, "suffixx": "", "echo": False}, headers=keyed(server)
    )
    assert openai_error(r, 400)["param"] == "suffixx"
    for name, value in (("n", 2), ("seed", 1)):  # OpenAI's, unknown to Anthropic
        r = httpx.post(server.url + "/v1/messages", json={**MESSAGE, name: value}, headers=keyed(server))
        assert anthropic_error(r, 400)["message"].startswith(f"{name}: Extra inputs are not permitted")


def test_the_official_openai_client_sees_unknown_fields_as_bad_requests(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0)
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": "x"}], max_tokens=2, extra_body={"max_token": 2}
        )
    assert exc.value.body["param"] == "max_token"
    # What the client sends by default, and fields we accept and ignore, pass.
    r = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=2,
        user="u-1",
        metadata={"k": "v"},
        store=False,
        parallel_tool_calls=False,
    )
    assert r.choices[0].finish_reason in ("length", "stop")


def test_no_strict_fields_ignores_unknown_fields_and_logs_each_once(lenient):
    for _ in range(3):
        r = httpx.post(
            lenient.url + "/v1/chat/completions",
            json={**CHAT, "max_token": 5, "frobnicate": True},
            headers=keyed(lenient),
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
    r = httpx.post(lenient.url + "/v1/messages", json={**MESSAGE, "n": 3}, headers=keyed(lenient))
    assert r.status_code == 200 and r.json()["type"] == "message"
    log = lenient.log.read_text()
    assert log.count("ignoring unknown request field 'max_token'") == 1
    assert log.count("ignoring unknown request field 'frobnicate'") == 1
    assert "/v1/messages: ignoring unknown request field 'n'" in log
