"""Rollouts for GRPO from a pool of `astrai-serve` servers, beside the in-process RolloutEngine.

Generation need not share the trainer's process or GPU (AReaLite's design): the trainer sends
each prompt's group (one /v1/completions request with n = group_size, token ids in and out,
`return_token_ids` and `logprobs: 0`) to one of the servers, and after each optimizer step
writes the policy's weights to a safetensors file and has every server pause, load it and
resume (astrai.serve.admin), under the step number as the weights' version. Same interface as
RolloutEngine (`sync(policy, version)`, `generate(prompt_ids, params, seeds) -> Rollout`), so
GRPOModule switches with `model.rollout: {servers: [...]}` and nothing else.

Balancing: each request goes to the healthy server with the fewest of our requests in flight
(round-robin among equals). A server that fails a request (connection lost, 5xx, timeout) is
set aside for `retry_after` seconds and the request is sent again to another, with the same
seed, so a server killed mid-rollout costs time, not samples. A server that comes back gets
the current weights before it serves again. On one host the weights go through /dev/shm
(memory) when it exists.

Several trainer processes (DDP): the weights are the same on every rank, so only global rank 0
(the leader) writes them and drives pause / update / resume; the other ranks (followers) push
nothing. The first sync, made where GRPOModule builds the client (the trainer's thread, the same
point on every rank), ends with a broadcast from rank 0, so no rank generates before the
servers hold this run's weights. A later ``sync`` on a follower only records the version and
returns: its next ``generate`` first waits (polling /v1/models) until a server reports that
version or a newer one, and uses only such servers. No collective is made after the first
sync, so ``sync`` may run in the asynchronous producer's thread (grpo_async.py), where each
rank's syncs happen at times of their own (a waiting sync can be replaced by a newer one) and a
barrier would deadlock or pair the wrong calls; rank 0's producer pushes every version it is
given, in order, without waiting for anyone, so a follower's wait always ends. Strategies whose
ranks hold parts of the weights (FSDP, DeepSpeed, model parallel) are refused (check_strategy).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx
from torch import nn

from astrai.core.engine import SamplingParams
from astrai.core.errors import AstraiError, require

from .lora import LoRAConfig
from .rollout import Rollout, policy_state
from .weights_file import WeightsWriter

WEIGHTS_FILE = "model.safetensors"
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@dataclass
class RolloutConfig:
    """GRPO's `model.rollout`: generate on these servers instead of an in-process engine.

    Args:
        servers: base URLs of running `astrai-serve` servers (http://host:port) serving the
            policy's architecture; their weights are replaced by the policy's at the start.
        api_key: the servers' API key (default: $ASTRAI_API_KEY).
        admin_key: the servers' admin key for weight updates (default: the API key).
        timeout: seconds one request (a whole group) may take before it is retried elsewhere.
        max_attempts: servers one request is tried on before the rollout fails.
        retry_after: seconds a failed server is left out before it is checked again.
        pause_mode: how servers pause for a weight update: "interrupt" (requests in flight
            wait and go on under the new weights) or "finish" (they end first).
        recompute_kv: requests held across an update compute their keys/values again with the
            new weights (AReaLite's re-prefill); false keeps the old ones (faster, mixed policy).
        weights_dir: where the trainer writes the weights for the servers (default: a fresh
            directory in /dev/shm, else the system's temp directory); it must be readable by
            the servers under the same path.
    """

    servers: list[str] = field(default_factory=list)
    api_key: str | None = None
    admin_key: str | None = None
    timeout: float = 600.0
    max_attempts: int = 3
    retry_after: float = 2.0
    pause_mode: Literal["interrupt", "finish"] = "interrupt"
    recompute_kv: bool = True
    weights_dir: str | None = None

    @classmethod
    def of(cls, value: RolloutConfig | dict | None) -> RolloutConfig | None:
        """model.rollout as a RolloutConfig (YAML gives a dict), checked: errors name the field."""
        if value is None:
            return None
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(cls.__dataclass_fields__))
            require(
                not unknown,
                "model.rollout",
                f"has no setting {unknown}; its settings are {list(cls.__dataclass_fields__)}",
            )
            value = cls(**value)
        servers = value.servers
        require(
            isinstance(servers, list) and servers and all(isinstance(s, str) and s.startswith("http") for s in servers),
            "model.rollout.servers",
            f"must be a non-empty list of server URLs like http://127.0.0.1:8000, got {servers!r}",
        )
        require(value.timeout > 0, "model.rollout.timeout", f"must be > 0 seconds, got {value.timeout!r}")
        require(value.max_attempts >= 1, "model.rollout.max_attempts", f"must be >= 1, got {value.max_attempts!r}")
        require(value.retry_after >= 0, "model.rollout.retry_after", f"must be >= 0, got {value.retry_after!r}")
        require(
            value.pause_mode in ("interrupt", "finish"),
            "model.rollout.pause_mode",
            f"must be interrupt or finish, got {value.pause_mode!r}",
        )
        return value


@dataclass(eq=False)
class _Server:
    url: str
    in_flight: int = 0
    down_until: float = 0.0  # time.monotonic() before which it is left out
    version: int | None = None  # weights version it serves (None: not ours yet)
    last_error: str = ""


class RemoteRollout:
    """Rollouts from `astrai-serve` servers; see the module docstring."""

    def __init__(self, config: RolloutConfig | dict, lora: LoRAConfig | None = None, strategy=None) -> None:
        self.config = RolloutConfig.of(config)
        check_strategy(strategy)
        # The Lightning strategy when several processes train (None: one process, the leader).
        self._group = strategy if getattr(strategy, "world_size", 1) > 1 else None
        self.leader = self._group is None or self._group.global_rank == 0
        self._joined = self._group is None  # the first (collective) sync is done
        self.lora = lora
        self.api_key = self.config.api_key or os.environ.get("ASTRAI_API_KEY")
        self.admin_key = self.config.admin_key or os.environ.get("ASTRAI_ADMIN_KEY") or self.api_key
        self.servers = [_Server(url.rstrip("/")) for url in self.config.servers]
        self._turn = itertools.count()
        self.version: int | None = None
        self.sync_seconds = 0.0  # the last sync's write + update of every server (rank 0's; ~0 on others)
        self.weights_dir: Path | None = None  # a follower (DDP rank > 0) writes nothing
        self._writer = WeightsWriter()
        if self.leader:
            self.weights_dir = Path(self.config.weights_dir or _fresh_dir())
            if self.config.weights_dir is None:
                weakref.finalize(self, shutil.rmtree, self.weights_dir, True)
            self.weights_dir.mkdir(parents=True, exist_ok=True)
        self._max_model_len: int | None = None
        # One client for the admin calls: a new one costs ~50 ms (its SSL context), more than an update.
        self._client = httpx.Client(timeout=self.config.timeout + 10)

    def _headers(self, key: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"} if key else {}

    # -- the servers' limits and weights ---------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        """The smallest context of the servers that answer /v1/models."""
        if self._max_model_len is None:
            lengths = []
            for server in self.servers:
                try:
                    r = self._client.get(server.url + "/v1/models", headers=self._headers(self.api_key), timeout=30)
                    r.raise_for_status()
                    lengths.append(r.json()["data"][0]["max_model_len"])
                except (httpx.HTTPError, KeyError, ValueError) as e:
                    self._set_aside(server, f"/v1/models: {e}")
            if not lengths:
                raise AstraiError(f"model.rollout.servers: no server answered /v1/models ({self._errors()})")
            self._max_model_len = min(lengths)
        return self._max_model_len

    def sync(self, policy: nn.Module, version: int) -> None:
        """Write the policy's weights (adapters merged) and load them into every server that
        answers: pause, update_weights, resume. Later rollouts carry ``version``. Under DDP
        only rank 0 does this; see the module docstring for the other ranks."""
        start = time.perf_counter()
        if self._joined and self.leader:
            self._push(policy, version)
        elif self._joined:
            self.version = version  # generate() waits for a server that serves it
            for server in self.servers:
                server.version = None
        else:  # the first sync under DDP: every rank, in the trainer's thread
            error, updated = None, []
            if self.leader:
                try:
                    updated = self._push(policy, version)
                except Exception as e:  # told to the other ranks, which would wait for it otherwise
                    error = e
            told, updated = self._group.broadcast((None if error is None else str(error), updated), src=0)
            self._joined = True
            if error is not None:
                raise error
            if told is not None:
                raise AstraiError(f"rank 0 could not load the weights into the rollout servers: {told}")
            self.version = version
            for server in self.servers:  # those rank 0 updated serve this run's weights now
                server.version = version if server.url in updated else None
        self.sync_seconds = time.perf_counter() - start

    def _push(self, policy: nn.Module, version: int) -> list[str]:
        """The leader's sync; the URLs of the servers that took the weights."""
        self._write(policy_state(policy, self.lora))
        self.version = version
        updated = [server.url for server in self.servers if self._update(server)]
        if not updated:
            raise AstraiError(f"model.rollout.servers: no server took the new weights ({self._errors()})")
        return updated

    def _served_version(self, server: _Server) -> int | None:
        """The weights version a server reports on /v1/models (None: it did not answer)."""
        try:
            r = self._client.get(server.url + "/v1/models", headers=self._headers(self.api_key), timeout=30)
            r.raise_for_status()
            return int(r.json()["data"][0]["weights_version"])
        except (httpx.HTTPError, KeyError, ValueError, TypeError, IndexError) as e:
            self._set_aside(server, f"/v1/models: {e}")
            return None

    def _follow(self, server: _Server) -> bool:
        """A follower's stand-in for _update: the server may serve if it holds our version or a
        newer one (rank 0 went on), which only rank 0 loads into it."""
        served = self._served_version(server)
        if served is None or served < self.version:
            if served is not None:
                server.last_error = f"waiting for rank 0 to load weights version {self.version} (serves {served})"
            return False
        server.version = self.version
        return True

    def _follow_all(self) -> None:
        for server in self.servers:
            if server.down_until <= time.monotonic() and server.version != self.version:
                self._follow(server)

    def _write(self, state: dict) -> None:
        """One safetensors file (weights_file.py); tied tensors once (safetensors refuses shared
        storage), written under another name first so a server never reads half a file."""
        seen: set[int] = set()
        tensors = {}
        for name, tensor in state.items():
            if tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            tensors[name] = tensor
        self._writer.write(tensors, self.weights_dir / WEIGHTS_FILE)

    def _update(self, server: _Server) -> bool:
        """Pause, update, resume one server; False (and set aside) when it fails."""
        headers, timeout = self._headers(self.admin_key), self.config.timeout
        path = str(self.weights_dir / WEIGHTS_FILE)
        steps = [
            ("pause", {"mode": self.config.pause_mode, "timeout": timeout}),
            (
                "update_weights",
                {"path": path, "version": self.version, "recompute_kv": self.config.recompute_kv, "timeout": timeout},
            ),
            ("resume", {"timeout": timeout}),
        ]
        try:
            for op, body in steps:
                r = self._client.post(f"{server.url}/admin/{op}", json=body, headers=headers)
                if r.status_code in (401, 403):
                    raise AstraiError(f"model.rollout.admin_key: {server.url} refused the weight update: {r.text}")
                if r.status_code != 200:
                    hint = _PATH_HINT if r.status_code == 400 and _error_param(r) == "path" else ""
                    raise httpx.HTTPStatusError(
                        f"{op}: HTTP {r.status_code}: {r.text[:300]}{hint}", request=r.request, response=r
                    )
        except httpx.HTTPError as e:
            self._set_aside(server, f"weight update: {e}")
            self._resume_quietly(server, headers)
            return False
        except BaseException:  # Ctrl-C or a crash between pause and resume: the server stays ours to resume
            self._resume_quietly(server, headers)
            raise
        server.version = self.version
        return True

    def _resume_quietly(self, server: _Server, headers: dict[str, str]) -> None:
        """Do not leave a server paused: it still serves (its old weights) anyone else."""
        try:
            self._client.post(f"{server.url}/admin/resume", json={}, headers=headers, timeout=10)
        except httpx.HTTPError:
            pass

    # -- generation -------------------------------------------------------------------------
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, seeds: list[int] | None = None) -> Rollout:
        """``params.n`` completions of every prompt (one request per prompt, seeded), with the
        log-prob of each generated token under the server's raw distribution."""
        limit = self.max_model_len
        too_long = [i for i, p in enumerate(prompt_ids) if len(p) >= limit]
        if too_long:
            i = too_long[0]
            raise AstraiError(
                f"prompt {i} has {len(prompt_ids[i])} tokens, leaving no room to generate within the rollout "
                f"servers' max_model_len={limit}; lower data.max_prompt_len or serve a longer context"
            )
        start = time.perf_counter()
        bodies = [self._body(p, params, None if seeds is None else seeds[i], limit) for i, p in enumerate(prompt_ids)]
        answers = asyncio.run(self._send_all(bodies))
        out = Rollout(seconds=time.perf_counter() - start)
        for g, (prompt, answer) in enumerate(zip(prompt_ids, answers)):
            for choice in sorted(answer["choices"], key=lambda c: c["index"]):
                spans = choice.get("version_spans") or [[answer.get("weights_version", 0), 0]]
                out.prompt_ids.append(list(prompt))
                out.completion_ids.append(list(choice["token_ids"]))
                out.logps.append(list((choice.get("logprobs") or {}).get("token_logprobs") or []))
                out.texts.append(choice["text"])
                out.finish_reasons.append(choice["finish_reason"])
                out.group_ids.append(g)
                out.versions.append(min(v for v, _ in spans))  # the oldest weights that wrote any of it
        return out

    @staticmethod
    def _body(prompt: list[int], params: SamplingParams, seed: int | None, limit: int) -> dict:
        body = {
            "prompt": list(prompt),
            "n": params.n,
            "max_tokens": min(params.max_tokens, limit - len(prompt)),
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,
            "logprobs": 0,
            "return_token_ids": True,
            "ignore_eos": params.ignore_eos,
        }
        if params.stop_token_ids:
            body["stop_token_ids"] = list(params.stop_token_ids)
        seed = params.seed if seed is None else seed
        if seed is not None:
            body["seed"] = seed
        return body

    async def _send_all(self, bodies: list[dict]) -> list[dict]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self._revive = asyncio.Lock()  # one weight update at a time for a server that came back
        async with httpx.AsyncClient(timeout=self.config.timeout, limits=limits) as client:
            return await asyncio.gather(*(self._send(client, body) for body in bodies))

    async def _send(self, client: httpx.AsyncClient, body: dict) -> dict:
        """One request, tried on up to max_attempts servers."""
        for _ in range(self.config.max_attempts):
            server = await self._pick(client)
            server.in_flight += 1
            try:
                r = await client.post(server.url + "/v1/completions", json=body, headers=self._headers(self.api_key))
            except httpx.HTTPError as e:
                self._set_aside(server, f"{type(e).__name__}: {e}")
                continue
            finally:
                server.in_flight -= 1
            if r.status_code in _RETRY_STATUSES:
                self._set_aside(server, f"HTTP {r.status_code}: {r.text[:200]}")
                continue
            if r.status_code != 200:  # our request is wrong: another server would say the same
                raise AstraiError(f"model.rollout: {server.url} refused a rollout request ({r.status_code}): {r.text}")
            return r.json()
        raise AstraiError(
            f"model.rollout.servers: a rollout request failed on {self.config.max_attempts} attempt(s) "
            f"(model.rollout.max_attempts); last errors: {self._errors()}"
        )

    async def _pick(self, client: httpx.AsyncClient) -> _Server:
        """The least busy server that is up and serves the current weights; waits (up to the
        timeout) for one to come back when none is."""
        deadline = time.monotonic() + self.config.timeout
        while True:
            now = time.monotonic()
            ready = [s for s in self.servers if s.down_until <= now and s.version == self.version]
            if ready:
                turn = next(self._turn)
                return min(ready, key=lambda s: (s.in_flight, (self.servers.index(s) - turn) % len(self.servers)))
            async with self._revive:
                if not self.leader:  # rank 0 loads the weights: wait until a server has them
                    await asyncio.to_thread(self._follow_all)
                else:
                    for server in self.servers:
                        if server.down_until <= time.monotonic() and server.version != self.version:
                            if await self._healthy(client, server):  # back from a failure: current weights first
                                await asyncio.to_thread(self._update, server)
            if time.monotonic() > deadline:
                raise AstraiError(f"model.rollout.servers: no server is serving ({self._errors()})")
            if not any(s.down_until <= time.monotonic() and s.version == self.version for s in self.servers):
                await asyncio.sleep(min(self.config.retry_after, 0.5 if self.leader else 0.05) or 0.05)

    async def _healthy(self, client: httpx.AsyncClient, server: _Server) -> bool:
        try:
            ok = (await client.get(server.url + "/health", timeout=5)).status_code == 200
        except httpx.HTTPError as e:
            self._set_aside(server, f"/health: {e}")
            return False
        if not ok:
            self._set_aside(server, "/health: not ready")
        return ok

    def _set_aside(self, server: _Server, why: str) -> None:
        server.down_until = time.monotonic() + self.config.retry_after
        server.last_error = why
        if self.version is not None:
            server.version = None  # it may have restarted with other weights: update it before use

    def _errors(self) -> str:
        return "; ".join(f"{s.url}: {s.last_error or 'ok'}" for s in self.servers)


_PATH_HINT = (
    " (the server cannot read the weights the trainer wrote: a server on another host needs "
    "model.rollout.weights_dir on a file system both see)"
)


def _error_param(response: httpx.Response) -> str | None:
    try:
        return response.json()["error"]["param"]
    except (ValueError, KeyError, TypeError):
        return None


def check_strategy(strategy) -> None:
    """Refuse a Lightning strategy whose ranks do not each hold the whole policy: rank 0 alone
    writes the weights for the servers (see the module docstring)."""
    if strategy is None:
        return
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    name = type(strategy).__name__
    require(
        isinstance(strategy, (DDPStrategy, SingleDeviceStrategy)) and "DeepSpeed" not in name,
        "model.rollout.servers",
        f"needs each trainer process to hold the whole policy (one device or trainer.strategy: ddp): "
        f"rank 0 alone writes the weights for the servers, and under trainer.strategy {name} the "
        "ranks hold shards of them; train with ddp, or drop model.rollout for the in-process engine",
    )


def _fresh_dir() -> str:
    shm = Path("/dev/shm")
    return tempfile.mkdtemp(prefix="astrai-weights-", dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None)
