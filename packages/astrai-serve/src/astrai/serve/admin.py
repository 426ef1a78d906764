"""Weight updates on a running server: the admin endpoints and what each engine worker does.

An RL trainer (astrai.train.remote_rollout.RemoteRollout) keeps a pool of servers generating
its rollouts, and after each optimizer step it writes the policy's weights (safetensors) and
tells every server, AReaLite-style:

  POST /admin/pause          {"mode": "interrupt" | "finish", "timeout": s}
  POST /admin/update_weights {"path": a .safetensors file or a directory of them, "version": n,
                              "recompute_kv": true}
  POST /admin/resume         {}

"interrupt" stops every engine between two steps: requests in flight are held, not failed,
and go on after resume under the new weights (by default their keys/values are computed again
with them, as AReaLite re-prefills interrupted requests; `recompute_kv: false` keeps the old
ones, which is faster but mixes the two policies); each token's weights are recorded (the
`version_spans` of a choice that asked for `return_token_ids`), so the trainer knows which
version wrote which token. "finish" lets requests in flight end first; both hold new
requests (at the worker, before the engine) until resume. The version then shows in
/v1/models and in every response (`weights_version`).

These routes need the admin key (--admin-key; default the API key): RequestGuard checks it,
and with no key at all they are off (403). Pause, update and resume reach every worker over
the control plane (control_plane.py: `ask`) and answer when all have done it.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from astrai.core.errors import AstraiError

from .errors import APIError, bad_request, openai_error_body
from .request_fields import parse_json_object

ADMIN_PREFIX = "/admin/"
PAUSE_MODES = ("interrupt", "finish")
DEFAULT_TIMEOUT_S = 60.0
_FINISH_POLL_S = 0.01


# -- the worker side -------------------------------------------------------------------------
class CommandRefused(Exception):
    """A command a worker could not carry out because of what the request asked (a path with no
    weights, the weights of another model): the client's to fix, so the route answers `status`
    naming `param` (the control plane passes both on), not a 500."""

    def __init__(self, message: str, param: str, status: int = 400) -> None:
        super().__init__(message)
        self.http_status, self.param = status, param


def load_safetensors(path: str | Path, device: str) -> dict:
    """Every tensor of `path` (one .safetensors file, or every one in a directory) on `device`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise CommandRefused(f"'path': no .safetensors file at {path}; write the weights there first", "path")
    state: dict = {}
    for file in files:
        try:
            state.update(load_file(str(file), device=device))
        except (SafetensorError, OSError) as e:
            raise CommandRefused(f"'path': {file} is not a readable .safetensors file ({e})", "path") from None
    return state


class WorkerAdmin:
    """One worker's pause / update_weights / resume, run on its control thread (control_plane.py).

    `admitting` is the gate new requests wait at (EngineAPI._generate) while paused."""

    def __init__(self, engine, device: str) -> None:
        self.engine = engine
        self.device = device
        self.admitting = threading.Event()
        self.admitting.set()

    def commands(self) -> dict:
        return {"pause": self.pause, "update_weights": self.update_weights, "resume": self.resume}

    def _state(self, **extra: Any) -> dict[str, Any]:
        return {"paused": self.engine.paused, "weights_version": self.engine.weights_version, **extra}

    def pause(self, arg: dict) -> dict[str, Any]:
        start = time.perf_counter()
        self.admitting.clear()
        if arg["mode"] == "finish":
            deadline = time.monotonic() + arg["timeout"]
            while self.engine.has_unfinished_requests():
                if time.monotonic() > deadline:
                    self.admitting.set()
                    raise CommandRefused(
                        f"requests still running after {arg['timeout']:g} s of pause mode 'finish'; not paused "
                        "(raise 'timeout' or pause with mode 'interrupt')",
                        "timeout",
                        status=409,
                    )
                time.sleep(_FINISH_POLL_S)
        self.engine.pause()
        return self._state(held=self.engine.stats()["active_requests"], seconds=time.perf_counter() - start)

    def update_weights(self, arg: dict) -> dict[str, Any]:
        start = time.perf_counter()
        state = load_safetensors(arg["path"], self.device)
        loaded = time.perf_counter()
        try:  # names and shapes are checked before anything is copied: a refusal keeps the weights
            self.engine.update_weights(state, arg["version"], recompute=arg["recompute_kv"])
        except AstraiError as e:
            raise CommandRefused(f"'path': {e}", "path") from None
        end = time.perf_counter()
        return self._state(tensors=len(state), load_seconds=loaded - start, seconds=end - start)

    def resume(self, arg: Any) -> dict[str, Any]:
        self.engine.resume()
        self.admitting.set()
        return self._state()


async def admitted(admin: WorkerAdmin | None) -> None:
    """Wait (in the worker's event loop) while the server is paused."""
    while admin is not None and not admin.admitting.is_set():
        await asyncio.sleep(_FINISH_POLL_S)


# -- the HTTP side ---------------------------------------------------------------------------
def _body(raw: bytes, allowed: tuple[str, ...]) -> dict:
    body = parse_json_object(raw) if raw.strip() else {}
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise bad_request(f"unknown field {unknown[0]!r}; this endpoint takes {list(allowed)}", unknown[0])
    return body


def _timeout(body: dict) -> float:
    value = body.get("timeout", DEFAULT_TIMEOUT_S)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise bad_request(f"'timeout' must be a positive number of seconds, got {value!r}", "timeout")
    return float(value)


def parse_pause(raw: bytes) -> dict:
    body = _body(raw, ("mode", "timeout"))
    mode = body.get("mode", "interrupt")
    if mode not in PAUSE_MODES:
        raise bad_request(f"'mode' must be one of {list(PAUSE_MODES)}, got {mode!r}", "mode")
    return {"mode": mode, "timeout": _timeout(body)}


def parse_update(raw: bytes) -> dict:
    body = _body(raw, ("path", "version", "recompute_kv", "timeout"))
    path, version, recompute = body.get("path"), body.get("version"), body.get("recompute_kv", True)
    if not isinstance(recompute, bool):
        raise bad_request(f"'recompute_kv' must be true or false, got {recompute!r}", "recompute_kv")
    if not isinstance(path, str) or not path:
        what = "is required" if path is None else f"must be a non-empty string, got {path!r}"
        raise bad_request(
            f"'path' {what}: the .safetensors file or the directory of them that the trainer wrote", "path"
        )
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise bad_request(
            f"'version' is required: a non-negative integer (e.g. the trainer's step), got {version!r}", "version"
        )
    return {"path": path, "version": version, "recompute_kv": recompute, "timeout": _timeout(body)}


class AdminRoutes:
    """The admin routes of server.py's ProtocolSpec (which gives `control`, `response_queue_id`)."""

    def add_admin_endpoints(self) -> None:
        self.add_endpoint(ADMIN_PREFIX + "pause", self.admin_pause, ["POST"])
        self.add_endpoint(ADMIN_PREFIX + "update_weights", self.admin_update_weights, ["POST"])
        self.add_endpoint(ADMIN_PREFIX + "resume", self.admin_resume, ["POST"])

    async def admin_pause(self, request: Request) -> Response:
        return await self._admin(request, "pause", parse_pause)

    async def admin_update_weights(self, request: Request) -> Response:
        return await self._admin(request, "update_weights", parse_update)

    async def admin_resume(self, request: Request) -> Response:
        return await self._admin(request, "resume", lambda raw: {"timeout": _timeout(_body(raw, ("timeout",)))})

    async def _admin(self, request: Request, op: str, parse) -> Response:
        try:
            arg = parse(await request.body())
            answers = await asyncio.to_thread(self.control.ask, op, arg, arg["timeout"] + 5.0, self.response_queue_id)
            failed = [a for a in answers if "error" in a]
            if failed and op == "pause" and len(failed) < len(answers):
                # All or none: a server paused on some workers would hold the requests sent there.
                await asyncio.to_thread(self.control.ask, "resume", {}, arg["timeout"] + 5.0, self.response_queue_id)
            if failed:
                worker = failed[0]
                status = worker.get("status") or (503 if worker["error"].startswith("no answer") else 500)
                raise APIError(
                    status, f"{op} failed on worker {worker['worker']}: {worker['error']}", param=worker.get("param")
                )
        except APIError as e:
            return JSONResponse(openai_error_body(e), status_code=e.status)
        versions = {a["weights_version"] for a in answers}
        return JSONResponse(
            {
                "op": op,
                "weights_version": min(versions),
                "paused": all(a["paused"] for a in answers),
                "workers": answers,
            }
        )
