"""HTTP side: our own LitSpec with the OpenAI and Anthropic routes (launch.py builds and runs
the LitServer around it).

LitServe runs these routes in its API-server process. Each route validates and tokenizes
the request, sends one payload to the least busy worker (request_queue.py) and relays what
that worker sends back. All routes share the one LitAPI (one engine per worker, one or
more workers per device); LitServe's OpenAISpec is not used because it fixes finish_reason to
"stop", gives every chunk its own id and cannot serve a second protocol.

Every request first passes guard.py's RequestGuard (API key, body size). A route then reads
its body in a worker thread (`_read`): JSON parsing, the chat template and tokenizing a
multi-megabyte prompt take CPU seconds that must not stall the event loop, which answers every
other request, /health included.

A client that goes away is noticed here (the stream's generator is cancelled, or the
connection reports a disconnect), and an abort is sent so the engine's KV pages free up. Aborts
and /stats go over the control plane (control_plane.py), which reaches every worker, not just the
one that happens to take a queued payload.

A worker that dies takes its requests with it: a watchdog here checks the workers' processes
every WATCH_S (liveness.py) and ends the requests of a dead one at once with a 503 error in
the client's protocol; LitServe then starts a new worker (or, with --no-worker-restart, stops
the server).
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import Request, Response
from fastapi.responses import HTMLResponse, JSONResponse

from . import anthropic_protocol, openai_protocol
from .admin import AdminRoutes
from .anthropic_models import MessagesRequest
from .config import ServeConfig
from .control_plane import ControlPlane, combine_stats
from .errors import APIError, anthropic_error_body, openai_error_body
from .generation import Accumulator, ModelInfo, merge_events, worker_error
from .litserve_bridge import (
    LitAPI,
    LitAPIStatus,
    LitSpec,
    new_reply_buffer,
    queue_request,
)
from .liveness import process_alive
from .metrics import CONTENT_TYPE, Metrics
from .openai_models import ChatCompletionRequest, CompletionRequest
from .relay import as_event_dict
from .request_fields import parse_json_object, unknown_fields
from .sse import _ClosingStreamingResponse, _sse_anthropic, _sse_openai  # noqa: F401 - tests import them from here

log = logging.getLogger("astrai.serve")
OPENAI, ANTHROPIC = "openai", "anthropic"
_GONE = object()  # the client disconnected
# How often a handler waiting for a full answer checks that its client is still there: a small
# model on a GPU writes a 2,000-token answer in about a second, all of it wasted after a leave.
_DISCONNECT_POLL_S = 0.1
# Each generation route's request model: the fields it takes (any other is refused by the model,
# or dropped here with --no-strict-fields) and the request body schema /openapi.json shows.
_MODELS = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/messages": MessagesRequest,
}
# Unknown fields logged in lenient mode; bounded, since clients choose the names.
_MAX_LOGGED_FIELDS = 256
WATCH_S = 0.1  # how often the HTTP process checks that the workers live
_CHAT_PAGE_HTML = (Path(__file__).parent / "static" / "chat.html").read_text(encoding="utf-8")


def _error_response(protocol: str, err: APIError) -> JSONResponse:
    body = anthropic_error_body(err) if protocol == ANTHROPIC else openai_error_body(err)
    return JSONResponse(body, status_code=err.status)


class ProtocolSpec(AdminRoutes, LitSpec):
    """Routes of both protocols over one worker queue (LitServe keys the queue by `api_path`)."""

    def __init__(self, config: ServeConfig, info: ModelInfo, control: ControlPlane) -> None:
        super().__init__()
        self.api_path = "/v1/chat/completions"
        self.config = config
        self.info = info
        self.control = control
        self._metrics = Metrics(control.num_consumers)  # shared by the API-server processes (metrics.py)
        self._synced = False
        self._logged_fields: set[tuple[str, str]] = set()
        self._submitted: dict[str, int] = {}  # uid -> the worker it was sent to
        self._in_flight = [0] * control.num_workers  # per worker, this process's requests not yet forgotten
        self._watch: asyncio.Task | None = None
        self._dead_pids = [0] * control.num_workers  # per slot, the dead worker already dealt with

    @property
    def metrics(self) -> Metrics:
        """The shared counters, writing to this API-server process's row."""
        self._metrics.row = self.response_queue_id
        return self._metrics

    @property
    def stream(self) -> bool:
        return True  # every route reads the worker's output as a stream of messages

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["info"] = None  # the worker loads its own tokenizer; no need to pickle ours
        state["_metrics"] = None  # counted in the API-server processes only
        state["_watch"] = None
        return state

    def pre_setup(self, lit_api: LitAPI) -> None:
        self.add_endpoint("/v1/chat/completions", self.chat_completions, ["POST"])
        self.add_endpoint("/v1/completions", self.completions, ["POST"])
        self.add_endpoint("/v1/messages", self.messages, ["POST"])
        self.add_endpoint("/v1/models", self.models, ["GET"])
        self.add_endpoint("/stats", self.stats, ["GET"])
        self.add_endpoint("/metrics", self.prometheus, ["GET"])
        self.add_admin_endpoints()  # pause / update_weights / resume (admin.py)

    # -- plumbing to the worker ---------------------------------------------------------
    def _submit(self, payload: dict) -> tuple[str, deque, asyncio.Event]:
        """Register a reply buffer and send the payload to the least busy serving worker (as
        this process counts: its own requests in flight). On the event loop's thread: the
        queue's sockets belong to it, and a send never blocks (request_queue.py)."""
        worker = self._pick_worker()
        uid = uuid.uuid4().hex
        payload["uid"], payload["consumer"] = uid, self.response_queue_id  # where the worker's relay answers
        queue, event = deque(), asyncio.Event()
        self._submitted[uid] = worker
        self._in_flight[worker] += 1
        new_reply_buffer(self, uid, queue, event)
        queue_request(self, uid, payload, worker, self.control.liveness.pid(worker))
        return uid, queue, event

    def _pick_worker(self) -> int:
        liveness = self.control.liveness
        serving = [w for w, dead in enumerate(self._dead_pids) if liveness.pid(w) not in (0, dead)]
        if not serving:
            raise APIError(
                503, "no inference worker is serving right now (one is starting after a failure); retry shortly"
            )
        return min(serving, key=self._in_flight.__getitem__)

    # -- dead workers ---------------------------------------------------------------------
    async def _watch_workers(self) -> None:
        while True:
            await asyncio.sleep(WATCH_S)
            try:
                self.check_workers()
            except Exception:  # noqa: BLE001 - the watchdog must outlive any one bad check
                log.exception("worker watchdog")

    def check_workers(self) -> None:
        """End the requests of workers that died since the last check: each request went to
        one worker (_submit), so those of a dead one are known, whether it had started them
        or not; what it never read, its successor drops (request_queue.py)."""
        liveness = self.control.liveness
        for worker, handled in enumerate(self._dead_pids):
            pid = liveness.pid(worker)  # the slot's last ready worker; a new one overwrites it
            if not pid or pid == handled or process_alive(pid):
                continue
            self._dead_pids[worker] = pid
            lost = self._fail(worker, f"the inference worker serving this request (worker {worker}) died")
            log.error("inference worker %d (pid %d) died; ended its %d request(s) with 503", worker, pid, lost)

    def _fail(self, worker: int, why: str) -> int:
        """End with a 503 every waiting request sent to `worker`."""
        error = {"error": {"status": 503, "message": f"{why}; please retry", "param": None}}
        ended = 0
        for uid, sent_to in list(self._submitted.items()):
            item = self.response_buffer.get(uid)
            if item is not None and sent_to == worker:
                item.response_queue.append((error, LitAPIStatus.OK))
                item.event.set()
                ended += 1
        return ended

    async def _bursts(self, uid: str, queue: deque, event: asyncio.Event) -> AsyncIterator[list[dict]]:
        """What the worker sent for one payload, as lists: everything that arrived since the last
        look (one message when idle, several under load). Worker errors become APIError."""
        try:
            while True:
                await event.wait()
                items = list(queue)
                queue.clear()
                event.clear()  # no await since the copy: nothing can slip in between
                burst = []
                for data, status in items:
                    if status == LitAPIStatus.FINISH_STREAMING:
                        if burst:
                            yield burst
                        return
                    if status == LitAPIStatus.ERROR:
                        raise APIError(500, f"the inference worker failed: {_describe(data)}")
                    if "error" in data:
                        raise worker_error(data)
                    burst.append(data)
                if burst:
                    yield burst
        finally:
            self._forget(uid)

    def _forget(self, uid: str) -> None:
        """Drop a request's reply buffer: whatever still comes for it is ignored."""
        self.response_buffer.pop(uid, None)
        worker = self._submitted.pop(uid, None)
        if worker is not None:
            self._in_flight[worker] -= 1

    async def _event_batches(self, submitted: tuple[str, deque, asyncio.Event]) -> AsyncIterator[list[dict]]:
        """A submitted generation's events, merged per sample, as they arrive."""
        async for burst in self._bursts(*submitted):
            yield merge_events([as_event_dict(event) for reply in burst for event in reply["events"]])

    def _abort(self, request_id: str) -> None:
        # To every worker: only the one holding the request acts on it.
        self.control.abort(request_id)
        self.metrics.add("aborted", 1)
        log.info("client went away: aborted %s", request_id)

    async def _workers(self) -> list[dict]:
        """Every worker's {"worker", "device", "stats", ...} (or {"worker", "error"})."""
        workers = await asyncio.to_thread(self.control.stats, consumer=self.response_queue_id)
        if not any("stats" in w for w in workers):
            raise APIError(503, f"no inference worker answered: {workers[0].get('error')}")
        return workers

    async def _model_info(self) -> ModelInfo:
        """Engines may cap max_model_len to what their KV pools hold; learn the real limit once
        (the smallest over the engines, so every engine can serve every request)."""
        if not self._synced:
            self.info.max_model_len = combine_stats(await self._workers())["max_model_len"]
            self._synced = True
        return self.info

    # -- generation routes --------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(
            request,
            OPENAI,
            "/v1/chat/completions",
            openai_protocol.parse_chat,
            "chatcmpl",
            openai_protocol.chat_response,
            openai_protocol.ChatStream,
        )

    async def completions(self, request: Request) -> Response:
        return await self._generate(
            request,
            OPENAI,
            "/v1/completions",
            openai_protocol.parse_completion,
            "cmpl",
            openai_protocol.completion_response,
            openai_protocol.CompletionStream,
        )

    async def messages(self, request: Request) -> Response:
        return await self._generate(
            request,
            ANTHROPIC,
            "/v1/messages",
            anthropic_protocol.parse_messages,
            "msg",
            anthropic_protocol.message_response,
            None,
        )

    async def _generate(
        self,
        request: Request,
        protocol: str,
        route: str,
        parse: Callable,
        prefix: str,
        respond: Callable,
        stream_cls: type | None,
    ) -> Response:
        start = time.monotonic()
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_workers())
        request_id = anthropic_protocol.new_id() if protocol == ANTHROPIC else openai_protocol.new_id(prefix)
        try:
            raw = await request.body()
            gen, options = await asyncio.to_thread(self._read, raw, route, parse, await self._model_info())
            submitted = self._submit(gen.payload(request_id))
        except APIError as e:
            self.metrics.request_done(route, e.status)
            return _error_response(protocol, e)
        batches = self._event_batches(submitted)
        n = gen.params.get("n", 1)
        streaming = False
        try:
            # Streams too wait for the first reply, so an error the engine finds still gets a 4xx.
            first = await self._unless_gone(request, request_id, anext(batches, None))
            if first is _GONE:
                return Response(status_code=499)  # nobody is listening any more
            self.metrics.observe("ttft", time.monotonic() - start)
            if gen.stream:
                if protocol == ANTHROPIC:
                    streamer = anthropic_protocol.MessageStream(request_id, self.info, len(gen.prompt_ids), options)
                    fmt = _sse_anthropic
                else:
                    streamer, fmt = stream_cls(request_id, self.info, n, options), _sse_openai
                self.metrics.request_done(route, 200)
                body_iter = self._stream(request_id, first, batches, streamer, fmt, protocol, start)
                streaming = True
                return _ClosingStreamingResponse(
                    body_iter,
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                    on_close=lambda: self._forget(submitted[0]),
                )
            acc = Accumulator(n)
            if await self._unless_gone(request, request_id, _fold(first, batches, acc)) is _GONE:
                return Response(status_code=499)
        except APIError as e:
            self.metrics.request_done(route, e.status)
            return _error_response(protocol, e)
        finally:
            if not streaming:  # else the response forgets it when it closes
                self._forget(submitted[0])
        self._finished(acc, start)
        self.metrics.request_done(route, 200)
        return JSONResponse(respond(request_id, self.info, acc, options))

    def _read(self, raw: bytes, route: str, parse: Callable, info: ModelInfo) -> tuple[Any, dict]:
        """Body bytes -> (Generation, response options). Runs in a worker thread (see the module docstring); the tokenizer lets go of the GIL while it works
        (generation.encode)."""
        body = parse_json_object(raw)
        gen, options = parse(self._check_fields(body, route), info)
        return gen, options

    def _check_fields(self, body: dict, route: str) -> dict:
        """With strict_fields the body as it is: its model refuses an unknown field with a 400 naming
        it. Without, the body less its unknown fields, each logged once."""
        if self.config.strict_fields:
            return body
        accepted = _MODELS[route].accepted()
        unknown = unknown_fields(body, accepted)
        for name in unknown:
            if (route, name) not in self._logged_fields and len(self._logged_fields) < _MAX_LOGGED_FIELDS:
                self._logged_fields.add((route, name))
                log.warning("%s: ignoring unknown request field %r (--no-strict-fields); logged once", route, name[:60])
        return {k: v for k, v in body.items() if k in accepted} if unknown else body

    def rejected(self, path: str, status: int) -> None:
        """RequestGuard refused a request (401, 413): count it for the generation routes."""
        if path in _MODELS:
            self.metrics.request_done(path, status)

    async def _unless_gone(self, request: Request, request_id: str, awaitable: Any) -> Any:
        """Await `awaitable` unless the client disconnects first: then abort and return _GONE.

        Starlette does not cancel a handler when its client leaves, so poll for it.
        """
        task = asyncio.ensure_future(awaitable)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    self._abort(request_id)
                    return _GONE
        finally:
            if not task.done():
                task.cancel()

    async def _stream(
        self,
        request_id: str,
        first: list[dict] | None,
        batches: AsyncIterator[list[dict]],
        streamer: Any,
        fmt: Callable,
        protocol: str,
        start: float,
    ) -> AsyncIterator[str]:
        # One write per batch of events: under load that is far fewer writes than tokens.
        finished = False
        try:
            head = "".join(fmt(item) for item in streamer.start())
            if first is not None:
                yield head + "".join(fmt(item) for item in streamer.events(first))
                async for events in batches:
                    text = "".join(fmt(item) for item in streamer.events(events))
                    if text:
                        yield text
            finished = True
            tail = "".join(fmt(item) for item in streamer.end())
            yield (head if first is None else "") + tail + ("data: [DONE]\n\n" if protocol == OPENAI else "")
            self._finished(streamer.acc, start)
        except APIError as e:
            finished = True
            if protocol == ANTHROPIC:
                yield _sse_anthropic(("error", anthropic_error_body(e)))
            else:
                yield _sse_openai(openai_error_body(e))
        finally:
            if not finished:  # cancelled: the client disconnected mid-stream
                self._abort(request_id)

    def _finished(self, acc: Accumulator, start: float) -> None:
        metrics = self.metrics
        metrics.observe("latency", time.monotonic() - start)
        metrics.add("prompt_tokens", acc.prompt_tokens)
        metrics.add("generation_tokens", acc.completion_tokens)

    # -- other routes -------------------------------------------------------------------
    async def chat_page(self, request: Request) -> Response:
        """The chat page (static/chat.html): plain HTML and JavaScript, no build step, no CDN."""
        return HTMLResponse(_CHAT_PAGE_HTML, headers={"Cache-Control": "no-cache"})

    async def models(self, request: Request) -> Response:
        anthropic = "anthropic-version" in request.headers
        try:
            info = await self._model_info()
            version = combine_stats(await self._workers()).get("weights_version", 0)
        except APIError as e:
            return _error_response(ANTHROPIC if anthropic else OPENAI, e)
        if anthropic:
            created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info.created))
            model = {
                "type": "model",
                "id": info.name,
                "display_name": info.name,
                "created_at": created,
                "max_input_tokens": info.max_model_len - 1,
                "max_tokens": info.max_model_len - 1,
                "weights_version": version,
            }
            return JSONResponse({"data": [model], "has_more": False, "first_id": info.name, "last_id": info.name})
        model = {
            "id": info.name,
            "object": "model",
            "created": info.created,
            "owned_by": "astrai",
            "max_model_len": info.max_model_len,
            "weights_version": version,  # the served weights (admin.py: update_weights)
        }
        return JSONResponse({"object": "list", "data": [model]})

    async def stats(self, request: Request) -> Response:
        """ "engine": all engines together (counts summed, see combine_stats); "workers": each
        engine's own statistics and device."""
        try:
            workers = await self._workers()
        except APIError as e:
            return _error_response(OPENAI, e)
        return JSONResponse(
            {
                "model": self.info.name,
                "max_model_len": self.info.max_model_len,
                "engines": len(workers),
                "engine": combine_stats(workers),
                "workers": workers,
            }
        )

    async def prometheus(self, request: Request) -> Response:
        try:
            stats = combine_stats(await self._workers())
        except APIError:
            stats = {}
        return Response(self.metrics.render(stats), media_type=CONTENT_TYPE)


async def _fold(first: list[dict] | None, batches: AsyncIterator[list[dict]], acc: Accumulator) -> None:
    if first is None:
        return
    for event in first:
        acc.add(event)
    async for events in batches:
        for event in events:
            acc.add(event)


def _describe(data: Any) -> str:
    if isinstance(data, bytes):
        try:
            data = pickle.loads(data)
        except Exception:  # noqa: BLE001 - best effort description of a worker failure
            return "unknown error"
    return f"{type(data).__name__}: {data}"
