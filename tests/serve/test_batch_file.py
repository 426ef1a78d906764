"""`astrai-serve run-batch`: a file of OpenAI Batch requests run offline through the engine.
One result line per request, in order; bad lines become error records and the rest still run;
the results are what the engine itself generates for the same prompts."""

from __future__ import annotations

import json
import subprocess

from conftest import MAX_LEN, MODEL_NAME

from astrai.core.auto import AutoModel
from astrai.core.engine import InferenceEngine, SamplingParams
from astrai.core.tokenizer import AutoTokenizer

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def _request(custom_id: str, url: str, body: dict) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def _good(i: int) -> str:
    if i % 2:
        return _request(
            f"r{i}", COMPLETIONS, {"model": MODEL_NAME, "prompt": f"hello {i}", "max_tokens": 2, "ignore_eos": True}
        )
    messages = [{"role": "user", "content": f"count to {i}"}]
    body = {"model": MODEL_NAME, "messages": messages, "max_tokens": 2, "ignore_eos": True}
    return _request(f"r{i}", CHAT, body)


MALFORMED = [
    "{not json",
    json.dumps(["a", "list"]),
    json.dumps({"method": "POST", "url": CHAT, "body": {"messages": []}}),  # no custom_id
    _request("bad-url", "/v1/embeddings", {"input": "x"}),
    json.dumps({"custom_id": "bad-method", "method": "GET", "url": CHAT, "body": {}}),
    _request("bad-body", CHAT, "not an object"),
    _request("unknown-field", CHAT, {"messages": [{"role": "user", "content": "x"}], "temprature": 1}),
    _request("bad-temperature", COMPLETIONS, {"prompt": "x", "temperature": "hot"}),
    _request("stream", COMPLETIONS, {"prompt": "x", "stream": True}),
    _request("too-long", COMPLETIONS, {"prompt": "x", "max_tokens": MAX_LEN * 2}),
]


def _run_batch(serve_command, model_dir, tmp_path, lines: list[str], *extra) -> tuple[list[dict], str]:
    source, results = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    argv = serve_command("run-batch", "-i", source, "-o", results, "--model", model_dir, "--device", "cpu", *extra)
    argv += ["--served-model-name", MODEL_NAME, "--no-progress"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines()], done.stdout


def test_a_thousand_line_file_with_ten_malformed_lines_gives_990_results_and_10_error_records(
    serve_command, model_dir, tmp_path
):
    lines = [_good(i) for i in range(990)]
    for k, bad in enumerate(MALFORMED):  # spread through the file
        lines.insert(k * 97 + 5, bad)
    out, stdout = _run_batch(serve_command, model_dir, tmp_path, lines, "--max-batch-size", "128")
    assert len(out) == 1000
    ok = [r for r in out if r["response"] and r["response"]["status_code"] == 200]
    errors = [r for r in out if r not in ok]
    assert len(ok) == 990 and len(errors) == 10
    assert [r["custom_id"] for r in ok] == [f"r{i}" for i in range(990)]  # input order
    for r in ok:
        body = r["response"]["body"]
        assert body["object"] in ("chat.completion", "text_completion") and body["usage"]["completion_tokens"] == 2
        assert r["error"] is None and r["id"].startswith("batch_req_")
    not_requests = [r for r in errors if r["response"] is None]
    refused = [r for r in errors if r["response"] is not None]
    assert len(not_requests) == 5 and all(r["error"]["code"] == "invalid_request" for r in not_requests)
    assert sorted(r["custom_id"] for r in refused) == [
        "bad-body",
        "bad-temperature",
        "stream",
        "too-long",
        "unknown-field",
    ]
    for r in refused:
        assert r["response"]["status_code"] == 400 and r["response"]["body"]["error"]["message"]
    params = {r["custom_id"]: r["response"]["body"]["error"]["param"] for r in refused}
    assert params["unknown-field"] == "temprature" and params["bad-temperature"] == "temperature"
    assert "1000 requests: 990 results, 10 error records" in stdout


def test_results_are_the_engines_own_greedy_generations(serve_command, model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [[5, 17, 42], [7, 8, 9, 10, 11], [100, 3]]
    lines = [
        _request(f"p{i}", COMPLETIONS, {"prompt": ids, "max_tokens": 6, "temperature": 0, "ignore_eos": True})
        for i, ids in enumerate(prompts)
    ]
    out, _ = _run_batch(serve_command, model_dir, tmp_path, lines)
    engine = InferenceEngine(AutoModel.from_pretrained(model_dir), tokenizer)
    expected = engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    for result, completion in zip(out, expected):
        choice = result["response"]["body"]["choices"][0]
        assert choice["text"] == completion.text
        assert result["response"]["body"]["usage"]["completion_tokens"] == len(completion.token_ids) == 6


def test_a_missing_input_file_is_one_line_naming_it(serve_command, model_dir, tmp_path):
    argv = serve_command("run-batch", "-i", tmp_path / "nope.jsonl", "-o", tmp_path / "out.jsonl", "--model", model_dir)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "input:" in done.stderr and "nope.jsonl not found" in done.stderr and "Traceback" not in done.stderr
