"""Several HTTP processes on one port (--api-servers): requests, streams, /stats and /metrics
work whichever process a connection lands on, and /metrics counts the requests of all of them."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import re

import httpx
import openai
import pytest
from conftest import MODEL_NAME

from astrai.serve.metrics import Metrics


def _count_in_row(metrics: Metrics, row: int) -> None:
    metrics.row = row
    for _ in range(3):
        metrics.request_done("/v1/completions", 200)
    metrics.add("generation_tokens", 30)
    metrics.observe("ttft", 0.2)


def test_metrics_written_by_forked_processes_add_up_in_every_process():
    metrics = Metrics(num_rows=3)
    children = [mp.get_context("fork").Process(target=_count_in_row, args=(metrics, row)) for row in (1, 2)]
    for child in children:
        child.start()
    for child in children:
        child.join(30)
        assert child.exitcode == 0
    metrics.row = 0
    metrics.request_done("/v1/completions", 400)
    metrics.request_done("/v1/messages", 418)  # not a status of its own: counted as "other"
    assert metrics.requests() == {
        ("/v1/completions", "200"): 6,
        ("/v1/completions", "400"): 1,
        ("/v1/messages", "other"): 1,
    }
    text = metrics.render({})
    assert "astrai_generation_tokens_total 60" in text
    assert 'astrai_time_to_first_token_seconds_bucket{le="0.25"} 2' in text
    assert "astrai_time_to_first_token_seconds_count 2" in text


def _forked_children(pid: int) -> int:
    """Children of `pid` that run its own command line (LitServe's manager and HTTP processes)."""
    own = open(f"/proc/{pid}/cmdline", "rb").read()
    found = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and open(f"/proc/{entry}/cmdline", "rb").read() == own:
                found += 1
        except (OSError, ValueError):
            continue
    return found


@pytest.mark.slow
def test_two_api_servers_answer_streams_stats_and_one_set_of_metrics(cpu_server):
    server = cpu_server("--api-servers", "2")
    assert _forked_children(server.proc.pid) == 3  # LitServe's manager and two HTTP processes

    async def one() -> tuple[str, int]:
        # A client of its own per request: a new connection, for whichever process accepts it.
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0) as oai:
            text, chunks = "", 0
            async for chunk in await oai.completions.create(
                model=MODEL_NAME,
                prompt="hello world",
                max_tokens=12,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            ):
                text += chunk.choices[0].text if chunk.choices else ""
                chunks += 1
            return text, chunks

    async def many():
        return await asyncio.gather(*(one() for _ in range(16)))

    replies = asyncio.run(many())
    assert len({text for text, _ in replies}) == 1 and all(chunks >= 1 for _, chunks in replies)
    for _ in range(6):  # fresh connections: the answers cannot depend on the process
        with httpx.Client() as http:
            stats = http.get(server.url + "/stats", timeout=30).json()
            metrics = http.get(server.url + "/metrics", timeout=30).text
        assert stats["engines"] == 1 and stats["engine"]["active_requests"] == 0
        count = re.search(r'astrai_requests_total\{route="/v1/completions",status="200"\} (\d+)', metrics)
        assert count and int(count.group(1)) == 16
        assert "astrai_generation_tokens_total 192" in metrics
