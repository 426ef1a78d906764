"""The requests of bench/serve_soak.py: what its clients send and how each outcome is judged.

A module of its own to keep serve_soak.py under 500 lines. `Traffic` holds the official openai and
anthropic clients and an httpx client, and sends one request of a kind (ordinary traffic,
disconnects, bad requests, the long at_kill_* ones) as a `Record`; `classify` then says whether
its outcome was ok, an expected failure or an unexpected one.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import anthropic
import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import WORDS

# What a client picks, with weights: ordinary traffic, disconnects, bad requests.
KINDS = {
    "openai_chat_stream": 8,
    "openai_chat": 6,
    "openai_completion_stream": 5,
    "openai_completion": 4,
    "anthropic_stream": 6,
    "anthropic": 4,
    "httpx_chat_stream": 4,
    "httpx_completion_stream": 3,
    "httpx_messages_stream": 3,
    "disconnect_openai_stream": 4,
    "disconnect_anthropic_stream": 3,
    "disconnect_httpx_stream": 3,
    "cancel_task": 5,
    "bad_unknown_field": 2,
    "bad_surrogate": 2,
    "bad_oversize": 2,
    "bad_invalid_json": 2,
}
# Sent just before the kill, twice each, so the killed worker surely holds requests of every
# shape; long enough (AT_KILL_TOKENS, ignoring EOS) to be mid-generation when it dies.
AT_KILL = (
    "at_kill_openai_chat_stream",
    "at_kill_openai_chat",
    "at_kill_anthropic_stream",
    "at_kill_anthropic",
    "at_kill_httpx_completion_stream",
)
AT_KILL_TOKENS = 384  # + a prompt of at most 40 words: within tiny.json's 512 positions


class StreamError(Exception):
    """An error event inside a 200 stream."""


class ProtocolViolation(Exception):
    """A reply that does not keep its protocol (a stream without its end, a malformed body)."""


@dataclass
class Record:
    kind: str
    start: float
    end: float = 0.0
    status: int | None = None  # HTTP status when one came back
    error: str | None = None  # None: the request did what it should
    fail: str = ""  # status | stream_error | timeout | connection | protocol | client
    outcome: str = ""  # ok | expected | unexpected (classify)
    reason: str = ""


class Traffic:
    def __init__(self, args, url: str, model: str) -> None:
        self.args, self.url, self.model = args, url, model
        t = args.request_timeout
        self.oai = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=t)
        self.ant = anthropic.AsyncAnthropic(base_url=url, api_key="none", max_retries=0, timeout=t)
        self.http = httpx.AsyncClient(base_url=url, timeout=t, limits=httpx.Limits(max_connections=256))
        self.limit = _size(args.max_request_bytes)
        self.records: list[Record] = []

    async def aclose(self) -> None:
        await self.oai.close()
        await self.ant.close()
        await self.http.aclose()

    # -- request pieces ------------------------------------------------------------------
    def _text(self, rng: random.Random) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))

    def _sizes(self, rng: random.Random, tokens: int | None = None) -> dict:
        """max_tokens and temperature; `tokens`: exactly that many (ignore_eos), else a random
        --max-tokens length that may end early at EOS."""
        if tokens:
            return {"max_tokens": tokens, "temperature": 1.0, "ignore_eos": True}
        return {"max_tokens": rng.randint(*self.args.max_tokens), "temperature": 1.0}

    def _long(self, rng: random.Random) -> int:
        """Output length of a request meant to be left or cut mid-generation."""
        return 4 * rng.randint(*self.args.max_tokens)

    def _oai_kw(self, rng, tokens: int | None = None) -> dict:
        s = self._sizes(rng, tokens)
        extra = {"ignore_eos": True} if s.pop("ignore_eos", False) else None
        return {**s, **({"extra_body": extra} if extra else {})}

    # -- ordinary traffic ------------------------------------------------------------------
    async def openai_chat(self, rng, stream: bool, close_after: int | None = None, tokens: int | None = None) -> None:
        messages = [{"role": "user", "content": self._text(rng)}]
        kw = self._oai_kw(rng, tokens or (self._long(rng) if close_after else None))
        if not stream:
            r = await self.oai.chat.completions.create(model=self.model, messages=messages, **kw)
            if not r.choices or r.choices[0].finish_reason is None or r.usage is None:
                raise ProtocolViolation(f"chat completion without choices, finish_reason or usage: {r}")
            return
        s = await self.oai.chat.completions.create(
            model=self.model, messages=messages, stream=True, stream_options={"include_usage": True}, **kw
        )
        finished, n = False, 0
        try:
            async for chunk in s:
                n += 1
                finished = finished or any(c.finish_reason for c in chunk.choices)
                if close_after is not None and n >= close_after:
                    return  # leave mid-stream
        finally:
            await s.close()
        if not finished:
            raise ProtocolViolation(f"chat stream ended after {n} chunks without a finish_reason")

    async def openai_completion(self, rng, stream: bool) -> None:
        kw = self._oai_kw(rng)
        if not stream:
            r = await self.oai.completions.create(model=self.model, prompt=self._text(rng), **kw)
            if not r.choices or r.choices[0].finish_reason is None:
                raise ProtocolViolation(f"completion without choices or finish_reason: {r}")
            return
        s = await self.oai.completions.create(model=self.model, prompt=self._text(rng), stream=True, **kw)
        finished = False
        async for chunk in s:
            finished = finished or any(c.finish_reason for c in chunk.choices)
        if not finished:
            raise ProtocolViolation("completion stream ended without a finish_reason")

    async def anthropic_messages(
        self, rng, stream: bool, close_after: int | None = None, tokens: int | None = None
    ) -> None:
        s = self._sizes(rng, tokens or (self._long(rng) if close_after else None))
        # This SDK's create() has no temperature argument: it goes in the body as it is.
        kw = {
            "model": self.model,
            "max_tokens": s.pop("max_tokens"),
            "extra_body": s,
            "messages": [{"role": "user", "content": self._text(rng)}],
        }
        if not stream:
            m = await self.ant.messages.create(**kw)
            if m.stop_reason is None:
                raise ProtocolViolation(f"message without stop_reason: {m}")
            return
        async with self.ant.messages.stream(**kw) as st:
            n = 0
            async for _ in st:
                n += 1
                if close_after is not None and n >= close_after:
                    return  # leaving the block closes the response
            m = await st.get_final_message()
        if m.stop_reason is None:
            raise ProtocolViolation(f"message stream ended after {n} events without stop_reason")

    async def httpx_stream(self, rng, route: str, close_after: int | None = None, tokens: int | None = None) -> int:
        sizes = self._sizes(rng, tokens or (self._long(rng) if close_after else None))
        if route == "/v1/messages":
            body = {
                "model": self.model,
                "stream": True,
                **sizes,
                "messages": [{"role": "user", "content": self._text(rng)}],
            }
            headers, end = {"anthropic-version": "2023-06-01"}, "event: message_stop"
        elif route == "/v1/chat/completions":
            body = {
                "model": self.model,
                "stream": True,
                **sizes,
                "messages": [{"role": "user", "content": self._text(rng)}],
            }
            headers, end = {}, "data: [DONE]"
        else:
            body = {"model": self.model, "stream": True, **sizes, "prompt": self._text(rng)}
            headers, end = {}, "data: [DONE]"
        async with self.http.stream("POST", route, json=body, headers=headers) as r:
            if r.status_code != 200:
                raise httpx.HTTPStatusError(
                    f"HTTP {r.status_code}: {(await r.aread())[:300]!r}", request=r.request, response=r
                )
            n, seen_end, event = 0, False, ""
            async for line in r.aiter_lines():
                if line.startswith("event: "):
                    event = line
                    seen_end = seen_end or line == end
                elif line.startswith("data: "):
                    n += 1
                    seen_end = seen_end or line == end
                    if event == "event: error" or (line.startswith('data: {"error"')):
                        raise StreamError(line[6:300])
                    if line != "data: [DONE]":
                        json.loads(line[6:])  # every data line must be JSON
                    if close_after is not None and n >= close_after:
                        return n  # leaving the block closes the connection
            if not seen_end:
                raise ProtocolViolation(f"{route} stream ended after {n} data lines without {end!r}")
            return n

    async def cancel_task(self, rng) -> None:
        """A request task cancelled at a random moment: its connection goes away mid-request."""
        pick = rng.randrange(3)
        tokens = self._long(rng)
        coro = (
            self.openai_chat(rng, stream=False, tokens=tokens)
            if pick == 0
            else self.openai_chat(rng, stream=True, tokens=tokens)
            if pick == 1
            else self.anthropic_messages(rng, stream=False, tokens=tokens)
        )
        task = asyncio.create_task(coro)
        done, _ = await asyncio.wait({task}, timeout=rng.uniform(0.05, 1.5))
        if task in done:
            task.result()  # finished first: its error, if any, is this request's
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    # -- bad requests (each must be refused with a 4xx) ----------------------------------------
    async def bad_unknown_field(self, rng) -> None:
        pick = rng.randrange(3)
        if pick == 0:
            await self.oai.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=4,
                extra_body={"bogus_field": 1},
            )
        elif pick == 1:
            await self.oai.completions.create(model=self.model, prompt="hi", max_tokens=4, extra_body={"max_token": 4})
        else:
            await self.ant.messages.create(
                model=self.model,
                max_tokens=4,
                messages=[{"role": "user", "content": "hi"}],
                extra_body={"bogus_field": True},
            )

    def _raw_body(self, rng, text_json: str) -> tuple[str, dict, bytes]:
        """(route, headers, body) with `text_json` (already JSON) as the user text."""
        route = rng.choice(["/v1/chat/completions", "/v1/completions", "/v1/messages"])
        model = json.dumps(self.model)
        if route == "/v1/completions":
            body = f'{{"model": {model}, "max_tokens": 4, "prompt": {text_json}}}'
        else:
            body = f'{{"model": {model}, "max_tokens": 4, "messages": [{{"role": "user", "content": {text_json}}}]}}'
        headers = {"content-type": "application/json"}
        if route == "/v1/messages":
            headers["anthropic-version"] = "2023-06-01"
        return route, headers, body.encode()

    async def _post_raw(self, route: str, headers: dict, content) -> None:
        r = await self.http.post(route, content=content, headers=headers)
        if r.status_code >= 300:
            raise httpx.HTTPStatusError(f"HTTP {r.status_code}: {r.content[:300]!r}", request=r.request, response=r)

    async def bad_surrogate(self, rng) -> None:
        await self._post_raw(*self._raw_body(rng, '"h\\ud800i"'))

    async def bad_oversize(self, rng) -> None:
        route, headers, _ = self._raw_body(rng, '""')
        body = self._raw_body(rng, json.dumps("a" * (self.limit + rng.randint(1, 4096))))[2]
        if rng.random() < 0.5:
            await self._post_raw(route, headers, body)  # with Content-Length: refused from the headers
        else:

            async def chunks():  # no Content-Length: chunked, refused once the limit is passed
                for i in range(0, len(body), 16384):
                    yield body[i : i + 16384]

            await self._post_raw(route, headers, chunks())

    async def bad_invalid_json(self, rng) -> None:
        route, headers, body = self._raw_body(rng, '"hello"')
        cut = body[: rng.randint(1, len(body) - 1)] if rng.random() < 0.7 else body.replace(b":", b"=", 1)
        await self._post_raw(route, headers, cut)

    # -- one request -------------------------------------------------------------------------
    async def one(self, kind: str, rng: random.Random) -> Record:
        rec = Record(kind, time.monotonic())
        ops = {
            "openai_chat_stream": lambda: self.openai_chat(rng, True),
            "openai_chat": lambda: self.openai_chat(rng, False),
            "openai_completion_stream": lambda: self.openai_completion(rng, True),
            "openai_completion": lambda: self.openai_completion(rng, False),
            "anthropic_stream": lambda: self.anthropic_messages(rng, True),
            "anthropic": lambda: self.anthropic_messages(rng, False),
            "httpx_chat_stream": lambda: self.httpx_stream(rng, "/v1/chat/completions"),
            "httpx_completion_stream": lambda: self.httpx_stream(rng, "/v1/completions"),
            "httpx_messages_stream": lambda: self.httpx_stream(rng, "/v1/messages"),
            "disconnect_openai_stream": lambda: self.openai_chat(rng, True, close_after=rng.randint(1, 6)),
            "disconnect_anthropic_stream": lambda: self.anthropic_messages(rng, True, close_after=rng.randint(1, 8)),
            "disconnect_httpx_stream": lambda: self.httpx_stream(
                rng,
                rng.choice(["/v1/chat/completions", "/v1/completions", "/v1/messages"]),
                close_after=rng.randint(1, 6),
            ),
            "cancel_task": lambda: self.cancel_task(rng),
            "at_kill_openai_chat_stream": lambda: self.openai_chat(rng, True, tokens=AT_KILL_TOKENS),
            "at_kill_openai_chat": lambda: self.openai_chat(rng, False, tokens=AT_KILL_TOKENS),
            "at_kill_anthropic_stream": lambda: self.anthropic_messages(rng, True, tokens=AT_KILL_TOKENS),
            "at_kill_anthropic": lambda: self.anthropic_messages(rng, False, tokens=AT_KILL_TOKENS),
            "at_kill_httpx_completion_stream": lambda: self.httpx_stream(rng, "/v1/completions", tokens=AT_KILL_TOKENS),
            "bad_unknown_field": lambda: self.bad_unknown_field(rng),
            "bad_surrogate": lambda: self.bad_surrogate(rng),
            "bad_oversize": lambda: self.bad_oversize(rng),
            "bad_invalid_json": lambda: self.bad_invalid_json(rng),
        }
        try:
            await asyncio.wait_for(ops[kind](), self.args.request_timeout + 5)
            rec.status = 200
        except (TimeoutError, openai.APITimeoutError, anthropic.APITimeoutError, httpx.TimeoutException) as e:
            rec.fail, rec.error = "timeout", f"no answer within {self.args.request_timeout:g} s ({type(e).__name__})"
        except (openai.APIStatusError, anthropic.APIStatusError) as e:
            if e.status_code == 200:  # anthropic: an error event inside the stream
                rec.status, rec.fail, rec.error = 200, "stream_error", f"error event: {e.message}"[:300]
            else:
                rec.status, rec.fail, rec.error = e.status_code, "status", f"HTTP {e.status_code}: {e.message}"[:300]
        except httpx.HTTPStatusError as e:
            rec.status, rec.fail, rec.error = e.response.status_code, "status", str(e)[:300]
        except (openai.APIConnectionError, anthropic.APIConnectionError, httpx.TransportError) as e:
            rec.fail, rec.error = "connection", f"{type(e).__name__}: {e}"[:300]
        except (openai.APIError, anthropic.APIError, StreamError) as e:  # openai: an error event in a stream
            rec.status, rec.fail, rec.error = 200, "stream_error", f"error event: {getattr(e, 'message', e)}"[:300]
        except ProtocolViolation as e:
            rec.status, rec.fail, rec.error = 200, "protocol", str(e)[:300]
        except Exception as e:  # noqa: BLE001 - a malformed reply the clients choke on, or a bench bug
            rec.fail, rec.error = "client", f"{type(e).__name__}: {e}"[:300]
        rec.end = time.monotonic()
        return rec

    async def client(self, index: int, deadline: float) -> None:
        rng = random.Random(self.args.seed * 1000 + index)
        kinds, weights = list(KINDS), list(KINDS.values())
        for _ in range(self.args.max_requests):
            if time.monotonic() >= deadline:
                return
            self.records.append(await self.one(rng.choices(kinds, weights)[0], rng))


def _size(text: str) -> int:
    from astrai.serve.config import parse_size

    return parse_size(text, "max_request_bytes")


def classify(rec: Record, kill_t: float | None, window: float) -> None:
    if rec.kind.startswith("bad_"):
        if rec.status is not None and 400 <= rec.status < 500:
            rec.outcome, rec.reason = "expected", f"{rec.status}"
        else:
            rec.outcome = "unexpected"
            rec.reason = rec.error and f"{rec.fail}: {rec.error}" or f"accepted (HTTP {rec.status})"
        return
    if rec.error is None:
        rec.outcome = "ok"
        return
    in_window = kill_t is not None and kill_t <= rec.end <= kill_t + window
    died = rec.status == 503 or (rec.fail == "stream_error" and "died" in rec.error)
    if in_window and died:
        rec.outcome = "expected"
        rec.reason = "503 after the kill" if rec.status == 503 else "error event after the kill"
    elif in_window and rec.fail == "connection":
        rec.outcome, rec.reason = "expected", "connection error in the kill window"
    else:
        rec.outcome, rec.reason = "unexpected", f"{rec.fail}: {rec.error}"
