"""Weight updates on a running `astrai-serve` (admin.py): pause with requests in flight holds
them without failing them, update_weights loads a safetensors file, resume lets them go on
under the new weights, and every token says which weights wrote it; the served weights are
the new ones (greedy output equals the in-process engine's); keys and bodies are checked."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file
from weights_helpers import ADMIN, API, greedy_in_process, new_weights, start_server

from astrai.serve.admin import ADMIN_PREFIX
from astrai.serve.guard import RequestGuard

PROMPT = [5, 17, 33, 8]
LONG = 2000  # tokens per in-flight request: about a second or more of generation on one CPU thread


@pytest.fixture(scope="module")
def srv(model_dir, tmp_path_factory):
    # Two engine workers: pause, update and resume must reach both (over the control plane).
    server = start_server(model_dir, tmp_path_factory.mktemp("admin") / "server.log", "--workers", "2").wait_ready()
    yield server
    server.stop()


def post(srv, path: str, body=None, headers=ADMIN, **kwargs) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, headers=headers, timeout=120, **kwargs)


def complete(srv, max_tokens: int, out: list | None = None, **extra) -> dict:
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    r = httpx.post(srv.url + "/v1/completions", json={**body, **extra}, headers=API, timeout=300)
    assert r.status_code == 200, r.text
    if out is not None:
        out.append(r.json())
    return r.json()


def in_flight(srv, count: int, max_tokens: int) -> tuple[list[threading.Thread], list[dict]]:
    """`count` requests sent from threads, every one started (generating, or already done: on a
    loaded machine the first may finish before the last is admitted) and at least one still
    generating."""
    answers: list[dict] = []
    threads = [threading.Thread(target=complete, args=(srv, max_tokens, answers)) for _ in range(count)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while (running := (stats := srv.stats()["engine"])["running"]) + len(answers) < count or not running:
        assert time.monotonic() < deadline, f"the requests never started: {stats}, answers {answers}"
        time.sleep(0.02)
    return threads, answers


def test_admin_endpoints_need_the_admin_key(srv):
    for headers in ({}, API, {"Authorization": "Bearer wrong"}):
        r = post(srv, "/admin/pause", {"mode": "interrupt"}, headers=headers)
        assert r.status_code == 401, r.text
        assert "admin key" in r.json()["error"]["message"]
    assert srv.stats()["engine"]["weights_version"] == 0  # nothing was paused or loaded


def test_admin_endpoints_are_off_without_any_key():
    """RequestGuard as build_server installs it on a server started with neither key."""
    app = FastAPI()
    app.add_api_route("/admin/resume", lambda: {"paused": False}, methods=["POST"])
    app.add_api_route("/v1/models", lambda: {"data": []}, methods=["GET"])
    guarded = RequestGuard(app, api_key=None, max_request_bytes=1024, admin_key=None, admin_prefix=ADMIN_PREFIX)
    client = TestClient(guarded)
    r = client.post("/admin/resume", json={})
    assert r.status_code == 403 and "--admin-key" in r.json()["error"]["message"]
    assert client.get("/v1/models").status_code == 200  # the other routes stay open without a key


@pytest.mark.parametrize(
    "path, body, field",
    [
        ("/admin/update_weights", {"version": 1}, "path"),
        ("/admin/update_weights", {"path": "/x", "version": -1}, "version"),
        ("/admin/update_weights", {"path": "/x", "version": "1"}, "version"),
        ("/admin/update_weights", {"path": "/x", "version": 1, "dir": "/y"}, "dir"),
        ("/admin/update_weights", {"path": "/x", "version": 1, "recompute_kv": "yes"}, "recompute_kv"),
        ("/admin/pause", {"mode": "stop"}, "mode"),
        ("/admin/pause", {"timeout": 0}, "timeout"),
    ],
)
def test_bad_admin_bodies_get_a_400_naming_the_field(srv, path, body, field):
    r = post(srv, path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and repr(field)[1:-1] in error["message"]


def test_admin_body_that_is_not_json_is_refused(srv):
    r = httpx.post(srv.url + "/admin/pause", content=b"{not json", headers=ADMIN, timeout=30)
    assert r.status_code == 400, r.text


def _unlike_the_model(model_dir, path):
    """The test model's weights with one tensor's shape changed."""
    tensors = load_file(str(model_dir / "model.safetensors"))
    name = next(iter(tensors))
    tensors[name] = torch.zeros(3, 5)
    save_file(tensors, str(path))
    return name


@pytest.mark.parametrize("weights", ["missing", "not safetensors", "another shape"])
def test_update_from_weights_that_cannot_serve_is_a_400_naming_path_and_keeps_the_weights(
    srv, model_dir, tmp_path, weights
):
    path, needle = tmp_path / "w.safetensors", "w.safetensors"
    if weights == "not safetensors":
        path.write_text('{"a json file": "written where the weights should be"}')
    elif weights == "another shape":
        needle = _unlike_the_model(model_dir, path) + ": (3, 5)"
    before = complete(srv, 8)["choices"][0]["text"]
    r = post(srv, "/admin/update_weights", {"path": str(path), "version": 9})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "path" and needle in error["message"], error
    assert srv.stats()["engine"]["weights_version"] == 0
    assert complete(srv, 8)["choices"][0]["text"] == before  # the served weights did not change


def test_interrupted_requests_go_on_under_the_new_weights_and_say_which_wrote_which_token(srv, model_dir, tmp_path):
    model = new_weights(model_dir, seed=7, path=tmp_path / "v7.safetensors")
    threads, answers = in_flight(srv, 3, LONG)
    paused = post(srv, "/admin/pause", {"mode": "interrupt"})
    assert paused.status_code == 200, paused.text
    workers = paused.json()["workers"]
    held = sum(w["held"] for w in workers)  # all 3, unless one ended between the check and the pause
    assert paused.json()["paused"] and len(workers) == 2 and held >= 1
    before = srv.stats()["engine"]["generated_tokens"]
    time.sleep(0.3)
    assert srv.stats()["engine"]["generated_tokens"] == before  # held: no step runs while paused
    late: list[dict] = []  # a request sent while paused waits for resume
    waiting = threading.Thread(target=complete, args=(srv, 8, late))
    waiting.start()
    updated = post(srv, "/admin/update_weights", {"path": str(tmp_path / "v7.safetensors"), "version": 7})
    assert updated.status_code == 200, updated.text
    assert [w["weights_version"] for w in updated.json()["workers"]] == [7, 7] and not late
    assert post(srv, "/admin/resume", {}).json()["paused"] is False
    for t in [*threads, waiting]:
        t.join(timeout=300)
    spans = [a["choices"][0]["version_spans"] for a in answers]
    assert sum(len(s) == 2 for s in spans) == held and all(s == [[0, LONG]] for s in spans if len(s) == 1)
    for answer in answers:
        (choice,) = answer["choices"]
        assert choice["finish_reason"] == "length" and len(choice["token_ids"]) == LONG  # not failed
        if len(choice["version_spans"]) == 1:
            continue  # it ended before the pause
        assert answer["weights_version"] == 7
        (old, n_old), (new, n_new) = choice["version_spans"]
        assert (old, new) == (0, 7) and n_old > 0 and n_new > 0 and n_old + n_new == LONG
        # held tokens' keys/values were computed again (recompute_kv): the rest is the new model's own
        done = choice["token_ids"][:n_old]
        rest = min(n_new, 32)  # enough to tell, without generating the whole tail again
        assert choice["token_ids"][n_old : n_old + rest] == greedy_in_process(model, model_dir, PROMPT + done, rest)
    assert late[0]["choices"][0]["version_spans"] == [[7, 8]]
    models = httpx.get(srv.url + "/v1/models", headers=API, timeout=30).json()
    assert models["data"][0]["weights_version"] == 7
    # The served weights are the new ones, in both engines: greedy output equals the in-process
    # engine's with them (two requests at once go to both workers).
    both: list[dict] = []
    pair = [threading.Thread(target=complete, args=(srv, 24, both)) for _ in range(2)]
    for t in pair:
        t.start()
    for t in pair:
        t.join(timeout=120)
    expected = greedy_in_process(model, model_dir, PROMPT, 24)
    assert [a["choices"][0]["token_ids"] for a in both] == [expected, expected]


def test_pause_finish_lets_requests_in_flight_end_under_the_old_weights(srv, model_dir, tmp_path):
    version = srv.stats()["engine"]["weights_version"]
    new_weights(model_dir, seed=8, path=tmp_path / "v8.safetensors")
    threads, answers = in_flight(srv, 2, LONG)
    paused = post(srv, "/admin/pause", {"mode": "finish", "timeout": 120})
    assert paused.status_code == 200, paused.text
    assert [w["held"] for w in paused.json()["workers"]] == [0, 0]  # they ended before the pause took hold
    post(srv, "/admin/update_weights", {"path": str(tmp_path / "v8.safetensors"), "version": version + 1})
    post(srv, "/admin/resume", {})
    for t in threads:
        t.join(timeout=300)
    assert [a["choices"][0]["version_spans"] for a in answers] == [[[version, LONG]]] * 2
    assert complete(srv, 4)["weights_version"] == version + 1


def test_streamed_chunks_carry_token_ids_and_the_weights_version(srv):
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    version = srv.stats()["engine"]["weights_version"]
    chunks = []
    with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True}, headers=API) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
    streamed = [t for c in chunks for choice in c["choices"] for t in choice["token_ids"]]
    assert streamed == complete(srv, 12)["choices"][0]["token_ids"]
    assert {c["weights_version"] for c in chunks} == {version}


def test_a_client_gone_during_a_finish_pause_ends_its_request_and_so_the_pause(srv):
    # The abort of a disconnected client must reach the engine while the pause waits for the
    # requests in flight to end; were it queued behind the pause, the request would run to
    # its last token first.
    before = srv.stats()["engine"]["generated_tokens"]
    paused: list[httpx.Response] = []
    pauser = threading.Thread(target=lambda: paused.append(post(srv, "/admin/pause", {"mode": "finish"})))
    body = {"prompt": PROMPT, "max_tokens": LONG, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, headers=API, timeout=300) as stream:
        lines = stream.iter_lines()
        while not next(lines).startswith("data: {"):
            pass  # the request generates
        pauser.start()
        time.sleep(0.3)  # the pause reaches the workers; the request has most of its tokens to go
        assert not paused  # the pause waits for it
    pauser.join(timeout=120)
    try:
        assert paused and paused[0].status_code == 200, paused and paused[0].text
        assert srv.stats()["engine"]["generated_tokens"] - before < LONG  # aborted, not run to its end
    finally:
        post(srv, "/admin/resume", {})


def test_stats_answer_while_a_finish_pause_waits_for_the_requests_in_flight(srv):
    threads, _ = in_flight(srv, 1, LONG)
    paused: list[httpx.Response] = []
    pauser = threading.Thread(target=lambda: paused.append(post(srv, "/admin/pause", {"mode": "finish"})))
    pauser.start()
    try:
        time.sleep(0.3)  # the pause is waiting for the request, which has most of its tokens to go
        stats = srv.stats()["engine"]
        assert not paused  # answered while the pause still waits
        assert stats["running"] == 1
    finally:
        pauser.join(timeout=120)
        post(srv, "/admin/resume", {})
        for t in threads:
            t.join(timeout=300)
    assert paused[0].status_code == 200, paused[0].text


def test_a_finish_pause_that_runs_out_of_time_is_a_409_naming_timeout_and_leaves_the_server_serving(srv):
    threads, answers = in_flight(srv, 1, LONG)
    try:
        r = post(srv, "/admin/pause", {"mode": "finish", "timeout": 0.05})
        assert r.status_code == 409, r.text
        error = r.json()["error"]
        assert error["param"] == "timeout" and "mode 'interrupt'" in error["message"], error
        for _ in range(4):  # not paused on any worker (the one without requests paused, then resumed)
            body = {"prompt": PROMPT, "max_tokens": 4, "ignore_eos": True}
            r = httpx.post(srv.url + "/v1/completions", json=body, headers=API, timeout=60)
            assert r.status_code == 200, r.text
    finally:
        for t in threads:
            t.join(timeout=300)
    assert answers and answers[0]["choices"][0]["finish_reason"] == "length"
