"""`astrai-serve --workers 2`: two engines, each in its own LitServe worker, behind one HTTP
server. On CPU both share the cores (`--devices N` puts one on each GPU; see
test_serve_multi_gpu.py).

Greedy outputs of concurrent requests, streamed or not, must equal the engine run offline in
this process, whichever engine answered; both engines must have taken part, /stats must show
each and their sum, and a client's disconnect must stop its request in whichever engine runs it.
The engines keep their KV cache in fp8 (--kv-cache-dtype), so that flag is covered end to end too:
the offline engine uses the same setting, and a float32 cache would give other tokens.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time

import httpx
import openai
import pytest

from astrai.core.auto import AutoModel
from astrai.core.engine import InferenceEngine, SamplingParams
from astrai.core.tokenizer import AutoTokenizer

pytestmark = pytest.mark.slow

WORDS = ["fox", "dog", "天气", "机器", "hello", "world", "12345", "language", "公园", "model"]


@pytest.fixture
def two_engines(launch, model_dir, serve_command, free_port, tmp_path):
    port = free_port()
    log = tmp_path / "server.log"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    argv = serve_command(
        "--model",
        model_dir,
        "--port",
        port,
        "--device",
        "cpu",
        "--workers",
        "2",
        "--served-model-name",
        "tiny",
        "--max-batch-size",
        "16",
        "--kv-cache-dtype",
        "fp8",
        "--log-level",
        "info",
    )
    server = launch(argv, port, log, model_dir, env=env)
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def chat_ids(tokenizer, messages):
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def wait_idle(server, timeout: float = 60) -> dict:
    """/stats once no engine runs or holds a request."""
    deadline = time.monotonic() + timeout
    while True:
        stats = server.stats()
        busy = [w["stats"]["active_requests"] + w["stats"]["running"] for w in stats["workers"]]
        if not any(busy):
            return stats
        assert time.monotonic() < deadline, f"engines still busy: {stats}"
        time.sleep(0.05)


def test_two_workers_answer_concurrent_requests_like_the_offline_engine(two_engines, model_dir):
    log = two_engines.log.read_text()
    assert log.count("KV cache:") == 2, log  # each worker logs its engine once it is built
    assert log.count("serving on http://") == 1, log  # and the address is said once

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    offline = InferenceEngine(AutoModel.from_pretrained(model_dir), tokenizer, max_batch_size=16, kv_cache_dtype="fp8")
    prompts = [[{"role": "user", "content": f"{WORDS[i % 10]} {WORDS[i * 3 % 10]} #{i}"}] for i in range(16)]
    refs = offline.generate([chat_ids(tokenizer, p) for p in prompts], SamplingParams(temperature=0, max_tokens=16))

    async def one(client, i):
        kwargs = dict(model="tiny", messages=prompts[i], max_tokens=16, temperature=0)
        if i % 2:
            r = await client.chat.completions.create(**kwargs)
            return r.choices[0].message.content, r.choices[0].finish_reason
        text, finish = "", None
        async for chunk in await client.chat.completions.create(**kwargs, stream=True):
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def run_all():
        async with openai.AsyncOpenAI(base_url=two_engines.url + "/v1", api_key="none", max_retries=0) as client:
            return await asyncio.gather(*(one(client, i) for i in range(len(prompts))))

    assert asyncio.run(run_all()) == [(r.text, r.finish_reason) for r in refs]

    # /stats hears from both engines: each generated some tokens, and "engine" is their sum.
    stats = wait_idle(two_engines)
    workers = stats["workers"]
    assert stats["engines"] == 2 and [w["worker"] for w in workers] == [0, 1], stats
    assert {w["device"] for w in workers} == {"cpu"} and workers[0]["pid"] != workers[1]["pid"]
    totals = [w["stats"]["generated_tokens"] for w in workers]
    assert 0 not in totals, totals
    assert stats["engine"]["generated_tokens"] == sum(totals) == sum(len(r.token_ids) for r in refs)
    assert stats["engine"]["pages_total"] == sum(w["stats"]["pages_total"] for w in workers)
    assert stats["engine"]["kv_cache_dtype"] == "float8_e4m3fn", stats


def test_disconnects_stop_the_request_in_whichever_engine_runs_it(two_engines):
    """Six streams spread over the two engines; each client leaves after a few chunks. An abort
    sent to the wrong engine would leave its request running to max_tokens."""
    start = wait_idle(two_engines)
    body = {"model": "tiny", "max_tokens": 2000, "temperature": 0, "ignore_eos": True, "stream": True}

    async def leave_early(http, i):
        messages = [{"role": "user", "content": f"{WORDS[i]} go on forever"}]
        async with http.stream("POST", "/v1/chat/completions", json={**body, "messages": messages}) as r:
            assert r.status_code == 200, await r.aread()
            chunks = 0
            async for line in r.aiter_lines():
                chunks += line.startswith("data:")
                if chunks == 4:
                    return

    async def run_all():
        async with httpx.AsyncClient(base_url=two_engines.url, timeout=60) as http:
            await asyncio.gather(*(leave_early(http, i) for i in range(6)))

    # Both engines must take streams, else the routing is not put to the test; which worker
    # picks a request up is LitServe's choice, so a round where one took all six is repeated.
    for _ in range(3):
        before = wait_idle(two_engines)
        asyncio.run(run_all())
        stats = wait_idle(two_engines)
        if all(
            w["stats"]["generated_tokens"] > v["stats"]["generated_tokens"]
            for w, v in zip(stats["workers"], before["workers"])
        ):
            break
    else:
        raise AssertionError(f"three rounds of six streams all went to one engine: {start} -> {stats}")
    assert all(w["stats"]["running"] == 0 and w["stats"]["pages_used"] == 0 for w in stats["workers"]), stats
    # Every stream of the round that used both engines was aborted in the engine that ran it: a
    # misrouted abort would leave its request to end by length. (Counting tokens instead depends
    # on the machine's load: under load a chunk carries many tokens.)
    assert stats["engine"]["aborted_requests"] - before["engine"]["aborted_requests"] == 6, stats


def test_workers_is_checked_before_start(serve_command, model_dir):
    proc = subprocess.run(
        serve_command("--model", model_dir, "--device", "cpu", "--workers", "0"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "workers: must be an integer of at least 1" in proc.stderr, proc.stderr
