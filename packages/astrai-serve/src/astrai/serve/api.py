"""The LitAPI that runs in each of LitServe's inference workers: one engine per worker,
shared by every request that worker takes.

LitServe spawns the workers and unpickles this object in each, so the model and the engine
(with its thread) are created in `setup()`. With `enable_async=True` and an async-generator
`predict`, LitServe runs each request as its own task on one event loop, and those tasks all
feed the same engine: continuous batching happens in the engine, not in LitServe.

The HTTP side (server.py) sends generation payloads, already validated, to the worker it
picks (request_queue.py):
  {"op": "generate", "request_id", "uid", "consumer", "prompt_ids", "params", "stream"}
      -> {"events": [...]}*
The events do not travel through predict: the engine hands each step's events to relay.py,
which sends them on LitServe's reply transport (that is why the payload names LitServe's uid
and the HTTP process, "consumer", that waits for it); predict only waits for the end.
Failures come back as {"error": {"status", "message", "param"}} rather than exceptions, so
the HTTP side can answer in the client's protocol. Aborts and stats requests come over the
control plane (control_plane.py), which addresses every worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from astrai.core.engine.host_settings import quiet_gc

from .admin import WorkerAdmin, admitted
from .config import ServeConfig, cuda_index
from .control_plane import ControlPlane
from .generation import merge_events
from .litserve_bridge import BurstLoop, LitAPI, LitSpec
from .parent_watch import exit_with_parent
from .relay import RelayedRequest, StepRelay

log = logging.getLogger("astrai.serve")


def _error(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"status": status, "message": message, "param": param}}


def pin_gpu(device: str) -> str:
    """Make this worker's GPU the only one its process sees; returns the torch device to use.

    The engine steps on its own thread, and Triton launches kernels on the calling thread's
    current device, which is GPU 0 in every new thread: an engine on cuda:1 would launch its
    attention kernel on the wrong GPU. With the other GPUs hidden, GPU 0 is this worker's in
    every thread. Works only before CUDA starts in this process (LitServe spawns a fresh one).
    """
    if not device.startswith("cuda"):
        return device
    import torch

    index = cuda_index(device)
    if torch.cuda.is_initialized():
        log.warning("CUDA started before the worker's setup; cannot hide the other GPUs from %s", device)
        torch.cuda.set_device(index)
        return device
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",")] if visible else [str(i) for i in range(index + 1)]
    os.environ["CUDA_VISIBLE_DEVICES"] = ids[index]
    return "cuda:0"


def _start_relay(lit_api: EngineAPI, send, worker_id: int) -> None:
    lit_api.relay = StepRelay(send, worker_id)


class EngineAPI(LitAPI):
    def __init__(self, config: ServeConfig, spec: LitSpec, control: ControlPlane) -> None:
        super().__init__(spec=spec, enable_async=True, loop=BurstLoop(on_start=_start_relay))
        self.config = config
        self.control = control
        self.engine = None
        self.relay: StepRelay | None = None  # set in the worker by BurstLoop (_start_relay)
        self.admin: WorkerAdmin | None = None  # pause / update_weights / resume (admin.py), set in setup

    # -- worker start-up ----------------------------------------------------------------
    def setup(self, device: str) -> None:
        import torch

        from astrai.core.auto import AutoModel
        from astrai.core.engine import InferenceEngine
        from astrai.core.tokenizer import AutoTokenizer

        logging.basicConfig(
            level=self.config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        exit_with_parent()  # an orphaned worker would keep its GPU memory (parent_watch.py)
        cfg = self.config
        self.worker_id = int(os.environ.get("LITSERVE_WORKER_ID", "0"))  # set by LitServe before setup()
        delay = self.control.liveness.starting(self.worker_id)
        if delay:
            log.warning(
                "worker %d started again soon after its last start: waiting %.1f s first", self.worker_id, delay
            )
            time.sleep(delay)
        self.device_name = device
        device = pin_gpu(device)
        self.torch_device = device
        dtype = None if cfg.dtype == "auto" else cfg.dtype
        model = AutoModel.from_pretrained(cfg.model, dtype=dtype, device=device)
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        self.engine = InferenceEngine(model, tokenizer, cfg.engine_config(), device=device)
        self.engine.start()
        self._active: set[str] = set()
        self._aborted: deque[str] = deque(maxlen=4096)  # aborts of requests this engine has not seen (yet)
        self._loop: asyncio.AbstractEventLoop | None = None  # LitServe's loop, known from the first request
        self.admin = WorkerAdmin(self.engine, device)
        self.control.serve(self.worker_id, self._abort_from_control, self._describe, self.admin.commands())
        quiet_gc()
        self.control.liveness.ready(self.worker_id)
        stats = self.engine.stats()
        dtype_name = str(next(model.parameters()).dtype).removeprefix("torch.")
        gpu = f" (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']})" if device != self.device_name else ""
        log.info(
            "worker %d: model %s (%s, %.1fM parameters, %s) on %s%s; KV cache: %d pages of %d tokens (%s), "
            "max_model_len %d; torch threads %d",
            self.worker_id,
            cfg.name,
            cfg.model,
            model.num_parameters() / 1e6,
            dtype_name,
            self.device_name,
            gpu,
            stats["pages_total"],
            stats["page_size"],
            stats["kv_cache_dtype"],
            stats["max_model_len"],
            torch.get_num_threads(),
        )
        if self.worker_id != 0:  # the address once per server, not once per engine
            return
        host = "[::1]" if cfg.host == "::" else cfg.host
        log.info(
            "serving on http://%s:%d  (OpenAI: /v1/chat/completions, /v1/completions, /v1/models; "
            "Anthropic: /v1/messages; /health, /stats, /metrics)",
            host,
            cfg.port,
        )

    # -- request handling ---------------------------------------------------------------
    async def decode_request(self, request: dict, **kwargs: Any) -> dict:
        return request

    async def predict(self, request: dict, **kwargs: Any) -> AsyncIterator[dict]:
        self._loop = asyncio.get_running_loop()  # before the abort check in _generate: see _abort_from_control
        op = request.get("op")
        if op == "generate":
            async for message in self._generate(request):
                yield message
        else:
            yield _error(400, f"unknown operation {op!r}")

    async def encode_response(self, outputs: AsyncIterator[dict], **kwargs: Any) -> AsyncIterator[dict]:
        async for message in outputs:
            yield message

    def health(self) -> bool:
        """LitServe's /health asks this in the HTTP process: 503 while any worker's engine is down."""
        return all(self.control.liveness.serving())

    def format_encoded_response(self, data: Any) -> Any:
        return data  # keep dicts: the transport pickles them, no need for a JSON round trip

    def _abort_from_control(self, request_id: str) -> None:
        """An abort from the control thread. Remembered first, so a request that has not reached
        _generate yet ends there; then handed to the event loop, whose tasks run _generate's
        check-and-submit without a pause, so a request in progress is found in _active. The
        order (remember, then read _loop) leaves no gap with predict (set _loop, then check)."""
        self._aborted.append(request_id)
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._abort, request_id)

    def _abort(self, request_id: str) -> None:
        if request_id in self._active:
            self.engine.abort(request_id)

    def _describe(self) -> dict[str, Any]:
        """This worker's answer to a stats request (control thread)."""
        out: dict[str, Any] = {"device": self.device_name, "pid": os.getpid(), "stats": self.engine.stats()}
        if self.torch_device.startswith("cuda"):
            import torch

            out["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
            out["gpu_name"] = torch.cuda.get_device_name(self.torch_device)
            out["gpu_memory_allocated"] = torch.cuda.memory_allocated(self.torch_device)
        return out

    async def _generate(self, request: dict) -> AsyncIterator[dict]:
        from astrai.core.engine import LoopSink, SamplingParams

        request_id = request["request_id"]
        await admitted(self.admin)  # held here while the server is paused for a weight update
        if request_id in self._aborted:
            return  # the client left before its request reached the engine
        loop = asyncio.get_running_loop()
        relayed = RelayedRequest(request["uid"], request["consumer"], request["stream"], loop.create_future())
        try:
            params = SamplingParams(**request["params"])
            self.engine.stream_to(
                request["prompt_ids"], params, request_id, LoopSink(loop, relayed, self.relay.deliver)
            )
        except ValueError as e:  # the engine's own validation, e.g. a prompt longer than it allows
            yield _error(400, str(e))
            return
        # No per-token work here: the relay sends streamed events as each engine step ends.
        self._active.add(request_id)
        try:
            error = await relayed.done
        finally:
            self._active.discard(request_id)
            if not relayed.done.done():  # cancelled (the worker is stopping): free the engine's pages
                self.engine.abort(request_id)
        if error is not None:
            log.error("request %s failed: %s", request_id, error)
            yield _error(500, f"generation failed: {type(error).__name__}: {error}")
        elif relayed.held:
            yield {"events": merge_events(relayed.held)}
