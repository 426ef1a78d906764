"""Requests generated from the server's own /openapi.json, valid and invalid, against a real
`astrai-serve` (schemathesis): bad input gets a 4xx, never a 500; every status a route answers is
one the document lists, every error body matches the documented error schema of the route's
protocol, and a body the schema forbids is refused.

Not checked: that every schema-valid body is accepted. A few rules span fields or need the model
(`stream_options` only with `stream`, token ids within the vocabulary, a tool_use answered by a
tool_result), and JSON Schema does not say them.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from conftest import API_KEY, start_cpu_server
from hypothesis import HealthCheck, given, settings
from jsonschema_rs import Draft202012Validator  # schemathesis's validator
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
# A short context keeps every generated request quick: longer ones get the 400 that names max_tokens.
MAX_MODEL_LEN = 96


@pytest.fixture(scope="module")
def docs_server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("fuzz-log") / "server.log"
    srv = start_cpu_server(model_dir, log, "--api-key", API_KEY, "--docs", "--max-model-len", MAX_MODEL_LEN)
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/messages"]


# schemathesis's own pytest plugin (schema.parametrize) does not run under pytest 9, so each
# route's strategy is drawn from in a plain hypothesis test.
@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
@pytest.mark.parametrize("path", ROUTES)
def test_generated_requests_get_documented_answers_and_never_a_server_error(docs_server, path, mode):
    api = schemathesis.openapi.from_url(docs_server.url + "/openapi.json", headers=AUTH)
    operation = api.find_operation_by_path("POST", path)
    statuses = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def call(case):
        response = case.call_and_validate(base_url=docs_server.url, headers=AUTH, checks=CHECKS)
        statuses.append(response.status_code)

    call()
    # The run reached the engine (positive) or the validation (negative), not only the key check.
    expected = 200 if mode is GenerationMode.POSITIVE else 400
    assert expected in statuses, statuses


MINIMAL = {
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/v1/completions": {"prompt": "hi", "max_tokens": 2},
    "/v1/messages": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
}


@pytest.mark.slow
def test_every_optional_field_sent_as_null_is_accepted_as_the_document_says(docs_server):
    """OpenAI's SDKs send unset fields as null: the server takes null as "not sent", and the
    document must say so, or a client generated from it would refuse to send them."""
    doc = httpx.get(docs_server.url + "/openapi.json", headers=AUTH, timeout=10).json()
    for path, minimal in MINIMAL.items():
        ref = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        model = doc["components"]["schemas"][ref.rsplit("/", 1)[-1]]
        nulls = {name: None for name in model["properties"] if name not in model.get("required", ())}
        assert len(nulls) > 10, path
        body = {**nulls, **minimal}
        Draft202012Validator({"$ref": ref, "components": doc["components"]}).validate(body)
        response = httpx.post(docs_server.url + path, json=body, headers=AUTH, timeout=60)
        assert response.status_code == 200, (path, response.text)
