"""InferenceEngine: continuous batching over a paged KV cache, for one model on one device.

This file is the front door: it checks requests, queues them, runs steps (engine_core.py does the
work of one step) and hands results back to whoever waits for them. engine_build.py builds the
parts it serves with (cache, scheduler, core, CUDA graphs) from its EngineConfig.

Threads: requests may be submitted from any thread. `stream` and `astream` start a background
engine thread on first use (`start()` does it explicitly; `shutdown()` or the context manager
stops it). `generate` does not need it: without a running engine thread, the calling thread
runs the steps itself until its requests are done. All model work happens under one lock, so
both ways can be mixed.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from collections.abc import Sequence as SequenceABC

import torch
from torch import nn

from ..errors import AstraiError, require
from .attention_backend import AttentionBackend
from .config import EngineConfig
from .engine_build import build_parts, warm_up
from .host_settings import paused_gc
from .outputs import Completion, StreamEvent
from .params import SamplingParams
from .request_intake import is_token_id
from .request_output import END, LoopSink
from .sequence import Request
from .weights_check import check_state


class InferenceEngine:
    """Serve a CausalLM with a paged KV cache and continuous batching.

    model: a CausalLM (anything with .config, .kv_layout() and the cache-view forward); the
        engine puts it in eval mode on `device` and packs its q/k/v and gate/up weights so each
        group runs as one GEMM (packed_linear.py: the Parameters stay, as views of the packed
        weight, so the model still trains and loads weights as before).
    tokenizer: an AutoTokenizer; may be None when prompts are token ids and no stop strings
        are used (texts are then empty).
    config: an EngineConfig (config.py: batching, KV cache size and dtype, max_model_len, CUDA
        graphs); its fields may also be given as keyword arguments, which override it.
        The KV pool holds by default max_batch_size sequences of max_model_len, capped at 90%
        of free GPU memory on CUDA and at 1 GiB on CPU; max_model_len is lowered to what the
        pool can hold, so one sequence always fits. kv_cache_dtype "fp8" stores float8 e4m3
        (half the bytes of bf16, so twice the tokens fit and large-batch decode steps, which
        mostly read the cache, run faster; values are rounded to ~2 significant digits,
        kv_dtype.py). cuda_graphs (decode steps, cuda_graphs.py) default to on when the
        device is CUDA and the model can be captured (not MoE, not dynamic NTK RoPE, a
        graph-safe attention backend), with one log line saying why when it cannot;
        prefill_graphs (prefill_graphs.py) default to on whenever the decode graphs are.
    device: where the model and the cache live (default: the model's device). On CUDA the
        process keeps one torch CPU thread unless OMP_NUM_THREADS is set (engine/host_settings.py says why).
    attention_backend: the paged attention implementation (default: the Triton kernel on CUDA,
        TorchPagedAttention elsewhere).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer=None,
        config: EngineConfig | None = None,
        *,
        device: str | torch.device | None = None,
        attention_backend: AttentionBackend | None = None,
        **settings,
    ):
        parts = build_parts(model, tokenizer, config, settings, device, attention_backend)
        self.config, self.device, self.model, self.tokenizer = parts.config, parts.device, parts.model, tokenizer
        self.page_size, self.max_batch_size = parts.page_size, parts.max_batch_size
        self.max_model_len, self.eos_ids = parts.max_model_len, parts.eos_ids
        self.cache, self.allocator, self.scheduler = parts.cache, parts.allocator, parts.scheduler
        self.intake, self.core = parts.intake, parts.core

        self._step_lock = threading.RLock()  # model, cache, scheduler and core state
        self._cv = threading.Condition()  # inbox, aborts, active requests, thread control
        self._inbox: list[Request] = []
        self._aborts: set[str] = set()
        self._active: dict[str, Request] = {}
        self._arrivals = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._busy = False
        self._paused = False  # pause(): the thread runs no step until resume()
        self._ended_outside_steps: list[Request] = []  # aborted between steps, for step() to report
        if self.device.type == "cuda":
            warm_up(self)

    @property
    def weights_version(self) -> int:
        """Version given to the last update_weights (0 before any)."""
        return self.core.weights_version

    # ------------------------------------------------------------------------------------
    # public API
    # ------------------------------------------------------------------------------------
    def generate(
        self,
        prompts: str | list[int] | SequenceABC[str | list[int]],
        params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[Completion]:
        """Complete every prompt; returns one Completion per prompt, in order.

        A prompt is a string (tokenized with the tokenizer's special tokens, e.g. a leading BOS)
        or a list of token ids (used as is). `params` is one SamplingParams for all prompts or
        one per prompt. Every input is checked before anything is queued. Raises EngineError
        if a step serving these requests failed.
        """
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and all(map(is_token_id, prompts))):
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(params, SequenceABC):
            require(
                len(params) == len(prompts),
                "params",
                f"has {len(params)} entries for {len(prompts)} prompts; pass one SamplingParams or one per prompt",
            )
            params_list = list(params)
        else:
            params_list = [params] * len(prompts)
        requests = []
        for i, (prompt, p) in enumerate(zip(prompts, params_list)):
            try:
                requests.append(self.intake.build(prompt, p, None))
            except ValueError as e:
                raise AstraiError(f"prompts[{i}]: {e}") from None
        for r in requests:
            self._submit(r)
        try:
            with paused_gc():
                self._wait(requests, use_tqdm)
        finally:
            for r in requests:
                if not r.done.is_set():
                    self.abort(r.request_id)
        for r in requests:
            if r.error is not None:
                raise r.error
        return [r.completion for r in requests]

    def stream(
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> Iterator[StreamEvent]:
        """Submit one request now; iterate its StreamEvents (the samples' events interleave).

        Thread-safe. Closing the iterator early aborts the request. Bad input raises
        ValueError here, before anything is queued; a failed step raises EngineError from
        the iterator.
        """
        events: queue.SimpleQueue = queue.SimpleQueue()
        request = self.intake.build(prompt, params, request_id, sink=events.put)
        self._submit(request)
        self.start()
        return self._iterate(request, events)

    def astream(
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[StreamEvent]:
        """Async version of `stream` for an asyncio loop: `async for event in engine.astream(...)`.

        Input is checked here; the request is queued when iteration starts. Cancelling the
        consuming task (e.g. a client disconnect) aborts the request.
        """
        request = self.intake.build(prompt, params, request_id)
        return self._aiterate(request)

    def stream_to(
        self, prompt: str | list[int], params: SamplingParams | None, request_id: str, sink: LoopSink
    ) -> None:
        """Submit one request now; its StreamEvents, then END (or the EngineError that ended it),
        go to `sink`. A LoopSink's deliver function gets, once per engine step and inside its
        loop, the (target, item) pairs of every request that shares it: a server streaming many
        requests handles a step in one call rather than waking a task per request.

        Thread-safe. Bad input raises ValueError here, before anything is queued.
        """
        self._submit(self.intake.build(prompt, params, request_id, sink=sink))
        self.start()

    def abort(self, request_id: str) -> None:
        """Stop a request; its unfinished samples end with finish_reason "abort". Unknown ids are ignored."""
        with self._cv:
            if request_id not in self._active:
                return
            self._aborts.add(request_id)
            self._cv.notify_all()
        if not self._thread_alive():
            with self._step_lock:
                self._turn(run_step=False)

    def pause(self) -> None:
        """Stop stepping (after the step in progress) until `resume()`: requests in flight keep
        their state and KV pages, new ones wait in the queue. For a weight update between two
        steps of generations that then go on under the new weights (interruptible generation)."""
        with self._cv:
            self._paused = True
        with self._step_lock:  # the step in progress, if any, has ended; the thread checks the flag next
            pass

    def resume(self) -> None:
        """Step again after `pause()` (a no-op when not paused)."""
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused

    def start(self) -> InferenceEngine:
        """Start the background engine thread (idempotent)."""
        with self._cv:
            if self._thread_alive():
                return self
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="astrai-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stop the engine thread; requests still in flight end with finish_reason "abort"."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._thread = None
        with self._cv:
            self._aborts.update(self._active)
        with self._step_lock:
            self._turn(run_step=False)

    def __enter__(self) -> InferenceEngine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def update_weights(
        self, weights: nn.Module | dict[str, torch.Tensor], version: int, recompute: bool = False
    ) -> None:
        """Copy new weights into the served model in place (GRPO pushes its policy here).

        `weights` is a model or a state dict with the same names and shapes; it is checked
        whole before anything is copied. It is applied between steps; the prefix cache is
        cleared (its pages were computed with the old weights). Sequences already running keep
        their cached keys/values, or with `recompute` have them computed again with the new
        weights (as preempted sequences are: AReaLite's interrupted generation). Outputs
        finishing afterwards carry `weights_version == version`.
        """
        require(is_token_id(version), "version", f"must be an integer, got {version!r}")
        state = weights.state_dict() if isinstance(weights, nn.Module) else weights
        require(isinstance(state, dict), "weights", f"must be a model or a state dict, got {type(weights).__name__}")
        check_state(self.model.state_dict(), state)
        with self._step_lock:
            self.core.load_weights(state, version, recompute)

    def stats(self) -> dict:
        """A snapshot of the engine: queue sizes, page use, prefix-cache hits, throughput.

        Taken under the step lock so the numbers belong to one moment between steps.
        """
        with self._step_lock:
            return self._stats_unlocked()

    def _stats_unlocked(self) -> dict:
        s, a, c = self.scheduler, self.allocator, self.core
        return {
            "active_requests": len(self._active),
            "running": len(s.running),
            "waiting": len(s.waiting) + len(self._inbox),
            "pages_total": a.num_pages,
            "pages_used": a.num_used,
            "pages_free": a.num_free,
            "pages_cached": len(a.prefix_cache),
            "page_size": self.page_size,
            "kv_cache_dtype": str(self.cache.k.dtype).removeprefix("torch."),
            "prefix_cache_hit_rate": s.hit_tokens / s.lookup_tokens if s.lookup_tokens else 0.0,
            "preemptions": s.num_preemptions,
            "page_copies": s.num_page_copies,
            "steps": c.num_steps,
            "overlapped_steps": c.num_overlapped,
            "grouped_steps": c.num_grouped,
            "computed_tokens": c.num_computed,
            "generated_tokens": c.num_generated,
            "aborted_requests": c.num_aborted,
            "tokens_per_s": c.tokens_per_s(),
            "weights_version": c.weights_version,
            "weight_updates": c.weight_updates,
            "max_model_len": self.max_model_len,
        }

    # -- manual stepping (tests, custom loops): add_request + step, no thread needed --------
    def add_request(
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        """Queue a request without waiting for it; returns its id. Drive it with `step()`."""
        request = self.intake.build(prompt, params, request_id)
        self._submit(request)
        return request.request_id

    def step(self) -> list[Completion]:
        """Run one engine step in this thread; returns the requests it ended (failed ones with .error set)."""
        with self._step_lock:
            ended, self._ended_outside_steps = self._ended_outside_steps + self._turn(run_step=True), []
        return [r.completion for r in ended]

    def has_unfinished_requests(self) -> bool:
        return bool(self._active)

    # ------------------------------------------------------------------------------------
    # queueing and stepping
    # ------------------------------------------------------------------------------------
    def _submit(self, request: Request) -> None:
        with self._cv:
            require(
                request.request_id not in self._active, "request_id", f"{request.request_id!r} is already in flight"
            )
            request.arrival = next(self._arrivals)
            self._active[request.request_id] = request
            self._inbox.append(request)
            self._cv.notify_all()

    def _turn(self, run_step: bool) -> list[Request]:
        """Take in new requests and aborts, optionally run a step, and hand out what ended."""
        try:
            with self._cv:
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, set()
            for r in inbox:
                if r.completion is None:  # else it failed while it waited in the inbox
                    self.core.add(r)
            for request_id in aborts:
                r = self._active.get(request_id)
                if r is not None and r.completion is None:
                    self.core.abort(r)
            if run_step:
                self.core.step()
                self._fail_orphans()
        except Exception as e:  # a bug outside the guarded parts of a step: end everything, keep serving
            self.core.fail(list(self._active.values()), e)
        ended = self.core.take_ended()
        with self._cv:
            for r in ended:
                self._active.pop(r.request_id, None)
        for r in ended:
            r.done.set()
        self.core.flush()  # after done is set: a stream that sees its end finds the request done
        if not run_step:
            self._ended_outside_steps += ended
        return ended

    def _fail_orphans(self) -> None:
        """Never let a caller wait forever: a queued request with nothing left to run is a bug; end it."""
        if self.scheduler.has_work():
            return
        with self._cv:
            queued = {r.request_id for r in self._inbox}
            orphans = [
                r for r in self._active.values() if r.completion is None and not r.seqs and r.request_id not in queued
            ]
        if orphans:
            self.core.fail(orphans, RuntimeError("request has no sequence left to run but is not finished"))

    def _thread_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._stopping or (not self._paused and (self._inbox or self._aborts or self._busy))):
                    self._cv.wait()
                if self._stopping:
                    return
            with self._step_lock:
                if self._paused:  # paused between the check above and the lock: see pause()
                    continue
                self._turn(run_step=True)
                self._busy = self.scheduler.has_work()

    def _wait(self, requests: list[Request], use_tqdm: bool) -> None:
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(requests), desc="generate", unit="req")
        pending = list(requests)
        try:
            while pending:
                if self._thread_alive():
                    pending[0].done.wait(timeout=0.05)
                else:
                    with self._step_lock:
                        self._turn(run_step=True)
                still = [r for r in pending if not r.done.is_set()]
                if bar is not None:
                    bar.update(len(pending) - len(still))
                pending = still
        finally:
            if bar is not None:
                bar.close()

    def _iterate(self, request: Request, events: queue.SimpleQueue) -> Iterator[StreamEvent]:
        try:
            while True:
                item = events.get()
                if item is END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not request.done.is_set():
                self.abort(request.request_id)

    async def _aiterate(self, request: Request) -> AsyncIterator[StreamEvent]:
        events: asyncio.Queue = asyncio.Queue()
        request.sink = LoopSink(asyncio.get_running_loop(), events)
        self._submit(request)
        self.start()
        try:
            while True:
                item = await events.get()
                if item is END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not request.done.is_set():
                self.abort(request.request_id)
