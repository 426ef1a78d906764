"""The load of bench/serve_load.py: client processes that stream requests and time them.

One Python process that parses every streamed chunk can use a whole core and then sets the pace
instead of the server, so the requests are dealt round-robin to several processes ("spawn"
context), each with its own asyncio loop and connection pool. The parent tells them one start
moment on the monotonic clock (system-wide on Linux), so the elapsed time covers the whole run
and Poisson arrival delays stay relative to that moment; each process reports its own CPU time
over the timed run, which shows whether the clients could have been the limit.

A module of its own, importing nothing heavy: every client process imports it (and
bench/serve_load.py, its spawn parent's main module).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import time
from dataclasses import dataclass, field

import httpx

START_MARGIN_S = 0.2  # from telling the processes the start moment to that moment: all are waiting by then


@dataclass
class Result:
    start: float
    first: float | None = None
    end: float = 0.0
    tokens: int = 0
    chunk_times: list[float] = field(default_factory=list)
    error: str | None = None
    connection_error: bool = False  # the connection failed or broke, as against an HTTP or stream error


@dataclass
class LoadRun:
    results: list[Result]
    elapsed: float  # from the common start to the last request's end
    cpu_s: list[float]  # per client process, over the timed run
    wall_s: list[float]  # per client process: from the start to its last request's end
    server_cpu_before: dict[int, float] = field(default_factory=dict)  # pid -> CPU s, just before the start
    server_cpu_after: dict[int, float] = field(default_factory=dict)


# -- the two clients ------------------------------------------------------------------------------
class HttpxClient:
    """Streams through httpx with its own SSE parsing: the lightest client we have."""

    def __init__(self, url: str, api_key: str | None, pool: int, model: str | None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
        self.http = httpx.AsyncClient(base_url=url, headers=headers, timeout=None, limits=limits)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def send(self, path: str, body: dict) -> Result:
        result = Result(start=time.monotonic())
        try:
            async with self.http.stream("POST", path, json=body) as r:
                if r.status_code != 200:
                    result.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                    return _ended(result)
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        _take_chunk(result, json.loads(line[6:]))
                        if result.error:
                            break
        except httpx.TransportError as e:
            result.error, result.connection_error = f"{type(e).__name__}: {e}", True
        except httpx.HTTPError as e:
            result.error = f"{type(e).__name__}: {e}"
        return _ended(result)


def _take_chunk(result: Result, chunk: dict) -> None:
    if chunk.get("error"):
        result.error = f"stream error: {chunk['error'].get('message')}"
        return
    if chunk.get("usage"):
        result.tokens = chunk["usage"]["completion_tokens"]
    if any(c.get("text") or (c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
        _chunk_arrived(result)


def _chunk_arrived(result: Result) -> None:
    now = time.monotonic()
    result.first = result.first or now
    result.chunk_times.append(now)


def _ended(result: Result) -> Result:
    result.end = time.monotonic()
    return result


class OpenAIClient:
    """Streams through the official openai client, as an application would call the server."""

    def __init__(self, url: str, api_key: str | None, pool: int, model: str | None) -> None:
        import openai

        if not model:
            raise RuntimeError("the openai client needs the served model name (GET /v1/models gave none)")
        self.openai, self.model = openai, model
        limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
        self.client = openai.AsyncOpenAI(
            base_url=url + "/v1",
            api_key=api_key or "no-key",
            max_retries=0,
            timeout=None,
            http_client=openai.DefaultAsyncHttpxClient(limits=limits),
        )

    async def aclose(self) -> None:
        await self.client.close()

    async def send(self, path: str, body: dict) -> Result:
        result = Result(start=time.monotonic())
        common = dict(
            model=self.model,
            max_tokens=body["max_tokens"],
            temperature=body["temperature"],
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        try:
            if "messages" in body:
                stream = await self.client.chat.completions.create(messages=body["messages"], **common)
            else:
                stream = await self.client.completions.create(prompt=body["prompt"], **common)
            async for chunk in stream:
                if chunk.usage:
                    result.tokens = chunk.usage.completion_tokens
                if any(
                    getattr(c, "text", None) or getattr(getattr(c, "delta", None), "content", None)
                    for c in chunk.choices
                ):
                    _chunk_arrived(result)
        except self.openai.APIConnectionError as e:  # timeouts included
            result.error, result.connection_error = f"{type(e).__name__}: {e}", True
        except self.openai.APIError as e:  # a status error, or an error event inside the stream
            result.error = f"{type(e).__name__}: {e}"
        return _ended(result)


CLIENTS = {"httpx": HttpxClient, "openai": OpenAIClient}


# -- one client process ------------------------------------------------------------------------
def client_main(conn, job: dict) -> None:
    """A client process: a short first request, then per phase: say ready, wait for the start
    moment, send its share of the requests, send back the results and its CPU time."""
    try:
        asyncio.run(_phases(conn, job))
    except Exception as e:  # reported to the parent, which stops the run
        try:
            conn.send(("failed", f"{type(e).__name__}: {e}"))
        except OSError:
            pass  # the parent is gone
    finally:
        conn.close()


async def _phases(conn, job: dict) -> None:
    """Each phase on a client (and connection pool) of its own. httpcore's pool hands every
    request queued in one pass the same idle keep-alive connection, and all but one retry: a
    burst of requests on a pool of idle connections goes out nearly one at a time, which delays
    the server's first tokens for the client's sake. A fresh pool opens one connection per
    request of the burst instead."""
    first = await _with_client(job, lambda client: client.send(*job["first"]))  # server set-up stays untimed
    if first.error:
        raise RuntimeError(f"the first request failed: {first.error}")
    for items in job["phases"]:

        async def phase(client, items=items):
            conn.send(("ready", None))
            start = conn.recv()
            return await _timed(client, items, start, job["concurrency"])

        conn.send(("done", await _with_client(job, phase)))


async def _with_client(job: dict, use):
    client = CLIENTS[job["client"]](job["url"], job["api_key"], job["pool"], job["model"])
    try:
        return await use(client)
    finally:
        await client.aclose()


async def _timed(client, items: list[tuple[str, dict, float]], start: float, concurrency: int) -> dict:
    limit = asyncio.Semaphore(concurrency)

    async def one(path: str, body: dict, delay: float) -> Result:
        await asyncio.sleep(max(0.0, start + delay - time.monotonic()))
        async with limit:
            return await client.send(path, body)

    await asyncio.sleep(max(0.0, start - time.monotonic()))
    cpu = time.process_time()
    results = await asyncio.gather(*(one(*item) for item in items))
    return {
        "results": [vars(r) for r in results],
        "cpu_s": time.process_time() - cpu,
        "wall_s": time.monotonic() - start,
    }


# -- the parent ----------------------------------------------------------------------------------
def run_load(
    phases: list[list[tuple[str, dict, float]]],
    first: tuple[str, dict],
    *,
    url: str,
    api_key: str | None,
    client: str,
    model: str | None,
    procs: int,
    concurrency: int | None,
    server_cpu=None,
) -> LoadRun:
    """Send every phase's requests (path, body, delay) from `procs` client processes; only the
    last phase is timed. `server_cpu()`, if given, is read just before the timed start and after
    its end (pid -> CPU seconds of the server's processes)."""
    n = max(1, min(procs, len(phases[-1])))
    ctx = mp.get_context("spawn")
    conns, workers = [], []
    for k in range(n):
        share = [items[k::n] for items in phases]
        limit = _share(concurrency, n, k) if concurrency else max(len(items) for items in share)
        job = dict(
            url=url,
            api_key=api_key,
            client=client,
            model=model,
            first=first,
            phases=share,
            concurrency=max(1, limit),
            pool=max(1, limit) + 2,
        )
        parent_end, child_end = ctx.Pipe()
        worker = ctx.Process(target=client_main, args=(child_end, job), name=f"load-client-{k}", daemon=True)
        worker.start()
        child_end.close()
        conns.append(parent_end)
        workers.append(worker)
    try:
        for i in range(len(phases)):
            _gather(conns, "ready")
            before = server_cpu() if server_cpu and i == len(phases) - 1 else {}
            start = time.monotonic() + START_MARGIN_S
            for conn in conns:
                conn.send(start)
            done = _gather(conns, "done")
        after = server_cpu() if server_cpu else {}
    except BaseException:
        for worker in workers:  # some may wait for a start moment that will not come
            worker.terminate()
        raise
    for worker in workers:
        worker.join(timeout=30)
        if worker.is_alive():
            worker.terminate()
    results: list[Result] = [None] * len(phases[-1])  # type: ignore[list-item]
    for k, d in enumerate(done):
        for j, r in enumerate(d["results"]):
            results[k + j * n] = Result(**r)
    walls = [d["wall_s"] for d in done]
    return LoadRun(results, max(walls), [d["cpu_s"] for d in done], walls, before, after)


def _share(total: int, n: int, k: int) -> int:
    """Process k's part of `total` split over n processes as evenly as possible."""
    return total // n + (1 if k < total % n else 0)


def _gather(conns, expected: str) -> list:
    """One message from every client process; a failed or vanished process ends the run."""
    out = []
    for k, conn in enumerate(conns):
        try:
            kind, payload = conn.recv()
        except EOFError:
            raise SystemExit(f"load client process {k} died") from None
        if kind != expected:
            raise SystemExit(f"load client process {k}: {payload}")
        out.append(payload)
    return out
