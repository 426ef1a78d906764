"""`astrai-serve --workers 2`: two engines, each in its own LitServe worker, behind one HTTP
server. On CPU both share the cores; on GPUs `--device cuda --workers N` puts one on each.

Greedy outputs of concurrent requests, streamed or not, must equal the engine run offline in
this process, whichever engine answered; and both engines must have taken part.
"""

from __future__ import annotations

import asyncio
import os
import subprocess

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
    argv = serve_command("--model", model_dir, "--port", port, "--device", "cpu", "--workers", "2",
                         "--served-model-name", "tiny", "--max-batch-size", "16", "--log-level", "info")
    server = launch(argv, port, log, model_dir, env=env)
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def chat_ids(tokenizer, messages):
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def engine_totals(server, tries: int = 60) -> set[int]:
    """generated_tokens of the engines that answer /stats (any worker may take a stats request)."""
    return {server.stats()["engine"]["generated_tokens"] for _ in range(tries)}


def test_two_workers_answer_concurrent_requests_like_the_offline_engine(two_engines, model_dir):
    log = two_engines.log.read_text()
    assert log.count("KV cache:") == 2, log  # each worker logs its engine once it is built

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    offline = InferenceEngine(AutoModel.from_pretrained(model_dir), tokenizer, max_batch_size=16)
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

    # Both engines generated: the two totals /stats reports are non-zero and add up to the total.
    totals = engine_totals(two_engines)
    assert len(totals) == 2 and 0 not in totals, totals
    assert sum(totals) == sum(len(r.token_ids) for r in refs)


def test_workers_is_checked_before_start(serve_command, model_dir):
    proc = subprocess.run(serve_command("--model", model_dir, "--device", "cpu", "--workers", "0"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "workers: must be an integer of at least 1" in proc.stderr, proc.stderr
