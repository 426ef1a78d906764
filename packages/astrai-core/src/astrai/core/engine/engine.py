"""InferenceEngine: continuous batching over a paged KV cache, for one model on one device.

A step flattens the new tokens of every scheduled sequence into one row, runs the model once
with a paged cache view, samples the sequences whose prompt is fully computed, and hands
out the new text. Requests join and leave the batch at every step.

Threads: requests may be submitted from any thread. `stream` and `astream` start a background
engine thread on first use (`start()` does it explicitly; `shutdown()` or the context manager
stops it). `generate` does not need it: without a running engine thread, the calling thread
runs the steps itself until its requests are done. All model work happens under one lock, so
both ways can be mixed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import queue
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence as SequenceABC

import torch
from torch import nn

from .attention import AttentionBackend, build_metadata, default_backend
from .outputs import Completion, EngineError, Sample, StreamEvent
from .page_allocator import PageAllocator
from .paged_cache import PagedKVCache
from .params import SamplingParams
from .sampler import Sampler, SampleRow
from .scheduler import Chunk, Scheduler, StepPlan
from .sequence import Request, Sequence, Status
from .stop import SampleText

_END = object()  # last item a request's sink receives
_RATE_WINDOW_S = 10.0
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class InferenceEngine:
    """Serve a CausalLM with a paged KV cache and continuous batching.

    model: a CausalLM (anything with .config, .kv_layout() and the cache-view forward).
    tokenizer: an AutoTokenizer; may be None when prompts are token ids and no stop strings
        are used (texts are then empty).
    max_batch_size: most sequences (samples) in one step.
    max_num_batched_tokens: token budget of one step; longer prompts are prefilled in chunks.
    page_size: tokens per KV page.
    num_pages / kv_cache_memory: size of the page pool, as a page count or a byte budget
        (an int or a string such as "2GiB"). Default: enough for max_batch_size sequences of
        max_model_len, capped at 90% of free GPU memory on CUDA and at 1 GiB on CPU.
    device: where the model and the cache live (default: the model's device).
    max_model_len: prompt + output limit per sequence (default and maximum: config.max_len);
        lowered to what the page pool can hold, so one sequence always fits.
    attention_backend: the paged attention implementation (default: the Triton kernel on CUDA,
        TorchPagedAttention elsewhere).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer=None,
        max_batch_size: int = 64,
        max_num_batched_tokens: int = 2048,
        page_size: int = 16,
        num_pages: int | None = None,
        kv_cache_memory: int | str | None = None,
        device: str | torch.device | None = None,
        max_model_len: int | None = None,
        attention_backend: AttentionBackend | None = None,
    ):
        for name, value in (("max_batch_size", max_batch_size), ("max_num_batched_tokens", max_num_batched_tokens),
                            ("page_size", page_size)):
            _require(isinstance(value, int) and value >= 1, name, f"must be a positive integer, got {value!r}")
        _require(max_num_batched_tokens >= max_batch_size, "max_num_batched_tokens",
                 f"({max_num_batched_tokens}) must be >= max_batch_size ({max_batch_size}): every running "
                 "sequence needs a token of each step's budget")
        if not hasattr(model, "kv_layout") or not hasattr(model, "config"):
            raise TypeError(f"model must be a CausalLM (with .config and .kv_layout()), got {type(model).__name__}")
        config = model.config
        if max_model_len is None:
            max_model_len = config.max_len
        _require(isinstance(max_model_len, int) and 2 <= max_model_len <= config.max_len, "max_model_len",
                 f"must be an integer in [2, model max_len={config.max_len}], got {max_model_len!r}")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.vocab_size = config.vocab_size
        dtype = next(model.parameters()).dtype
        layout = model.kv_layout()
        per_page = PagedKVCache.bytes_per_page(layout, page_size, dtype)
        num_pages = self._pool_size(num_pages, kv_cache_memory, per_page, page_size, max_batch_size, max_model_len)
        self.page_size = page_size
        self.max_model_len = min(max_model_len, num_pages * page_size)
        self.max_batch_size = max_batch_size
        self.cache = PagedKVCache(layout, num_pages, page_size, dtype, self.device)
        self.allocator = PageAllocator(num_pages)
        self.scheduler = Scheduler(self.allocator, page_size, max_batch_size, max_num_batched_tokens)
        self.backend = attention_backend or default_backend(self.device)
        vocab_limit = tokenizer.vocab_size if tokenizer is not None else None
        self.sampler = Sampler(vocab_limit)
        self.eos_ids = frozenset(tokenizer.stop_token_ids if tokenizer is not None else _config_eos(config))
        self.weights_version = 0

        self._step_lock = threading.RLock()  # model, cache and scheduler state
        self._cv = threading.Condition()  # inbox, aborts, thread control
        self._inbox: list[Request] = []
        self._aborts: set[str] = set()
        self._active: dict[str, Request] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._busy = False
        self._arrivals = itertools.count()
        self._ids = itertools.count()
        self._generated = 0
        self._steps = 0
        self._computed = 0
        self._recent: deque[tuple[float, int]] = deque()
        self._ended: list[Request] = []  # finished or failed since the last step returned
        self._outbox: list[tuple[object, object]] = []  # (sink, item) to deliver after the step

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
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and all(_is_id(t) for t in prompts)):
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(params, SequenceABC):
            _require(len(params) == len(prompts), "params",
                     f"has {len(params)} entries for {len(prompts)} prompts; pass one SamplingParams or one per prompt")
            params_list = list(params)
        else:
            params_list = [params] * len(prompts)
        requests = []
        for i, (prompt, p) in enumerate(zip(prompts, params_list)):
            try:
                requests.append(self._make_request(prompt, p, None))
            except ValueError as e:
                raise ValueError(f"prompts[{i}]: {e}") from None
        for r in requests:
            self._submit(r)
        try:
            self._wait(requests, use_tqdm)
        finally:
            for r in requests:
                if not r.done.is_set():
                    self.abort(r.request_id)
        for r in requests:
            if r.error is not None:
                raise r.error
        return [r.completion for r in requests]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None,
               request_id: str | None = None) -> Iterator[StreamEvent]:
        """Submit one request now; iterate its StreamEvents (the samples' events interleave).

        Thread-safe. Closing the iterator early aborts the request. Bad input raises
        ValueError here, before anything is queued; a failed step raises EngineError from
        the iterator.
        """
        events: queue.SimpleQueue = queue.SimpleQueue()
        request = self._make_request(prompt, params, request_id, sink=events.put)
        self._submit(request)
        self.start()
        return self._iterate(request, events)

    def astream(self, prompt: str | list[int], params: SamplingParams | None = None,
                request_id: str | None = None) -> AsyncIterator[StreamEvent]:
        """Async version of `stream` for an asyncio loop: `async for event in engine.astream(...)`.

        Input is checked here; the request is queued when iteration starts. Cancelling the
        consuming task (e.g. a client disconnect) aborts the request.
        """
        request = self._make_request(prompt, params, request_id)
        return self._aiterate(request)

    def abort(self, request_id: str) -> None:
        """Stop a request; its unfinished samples end with finish_reason "abort". Unknown ids are ignored."""
        with self._cv:
            if request_id not in self._active:
                return
            self._aborts.add(request_id)
            self._cv.notify_all()
        if not self._thread_alive():
            with self._step_lock:
                self._drain_inbox()
                self._flush()

    def start(self) -> "InferenceEngine":
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
            self._drain_inbox()
            self._flush()

    def __enter__(self) -> "InferenceEngine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    @torch.no_grad()
    def update_weights(self, weights: nn.Module | dict[str, torch.Tensor], version: int) -> None:
        """Copy new weights into the served model in place (GRPO pushes its policy here).

        `weights` is a model or a state dict with the same names and shapes. It is applied
        between steps; the prefix cache is cleared (its pages were computed with the old
        weights). Sequences already running keep their cached keys/values. Outputs finishing
        afterwards carry `weights_version == version`.
        """
        _require(isinstance(version, int) and not isinstance(version, bool), "version",
                 f"must be an integer, got {version!r}")
        state = weights.state_dict() if isinstance(weights, nn.Module) else weights
        _require(isinstance(state, dict), "weights", f"must be a model or a state dict, got {type(weights).__name__}")
        own = self.model.state_dict()
        self._check_state(own, state)
        with self._step_lock:
            for name, tensor in state.items():
                own[name].copy_(tensor)
            self.scheduler.reset_prefix_cache()
            self.weights_version = version

    def stats(self) -> dict:
        """A snapshot of the engine: queue sizes, page use, prefix-cache hits, throughput."""
        s, a = self.scheduler, self.allocator
        now = time.perf_counter()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= _RATE_WINDOW_S]
        span = now - recent[0][0] if recent else 0.0
        return {
            "running": len(s.running),
            "waiting": len(s.waiting) + len(self._inbox),
            "pages_total": a.num_pages,
            "pages_used": a.num_used,
            "pages_free": a.num_free,
            "pages_cached": len(a.prefix_cache),
            "page_size": self.page_size,
            "prefix_cache_hit_rate": s.hit_tokens / s.lookup_tokens if s.lookup_tokens else 0.0,
            "preemptions": s.num_preemptions,
            "page_copies": s.num_page_copies,
            "steps": self._steps,
            "computed_tokens": self._computed,
            "generated_tokens": self._generated,
            "tokens_per_s": sum(n for _, n in recent) / span if span > 0 else 0.0,
            "weights_version": self.weights_version,
            "max_model_len": self.max_model_len,
        }

    # ------------------------------------------------------------------------------------
    # manual stepping (tests, custom loops): add_request + step, no thread needed
    # ------------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request without waiting for it; returns its id. Drive it with `step()`."""
        request = self._make_request(prompt, params, request_id)
        self._submit(request)
        return request.request_id

    def step(self) -> list[Completion]:
        """Run one engine step in this thread; returns the requests it ended (failed ones with .error set)."""
        with self._step_lock:
            return [r.completion for r in self._guarded_step()]

    def has_unfinished_requests(self) -> bool:
        return bool(self._active)

    # ------------------------------------------------------------------------------------
    # requests in
    # ------------------------------------------------------------------------------------
    def _make_request(self, prompt, params, request_id, sink=None) -> Request:
        if params is None:
            params = SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        params = dataclasses.replace(params).validate()  # a private copy, normalised
        ids, text = self._prompt_ids(prompt)
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens but max_model_len is {self.max_model_len}, which "
                             "leaves no room to generate; shorten the prompt or raise max_model_len")
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("SamplingParams.stop needs a tokenizer; pass stop_token_ids instead")
        bad = [t for t in params.stop_token_ids or () if t >= self.vocab_size]
        _require(not bad, "SamplingParams.stop_token_ids", f"has ids {bad} outside the vocabulary (size {self.vocab_size})")
        if params.logprobs is not None:
            _require(params.logprobs <= self.vocab_size, "SamplingParams.logprobs",
                     f"asks for {params.logprobs} alternatives but the vocabulary has {self.vocab_size} tokens")
        _require(params.n <= self.max_batch_size, "SamplingParams.n",
                 f"({params.n}) exceeds the engine's max_batch_size ({self.max_batch_size})")
        if request_id is None:
            request_id = f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        _require(isinstance(request_id, str) and request_id, "request_id", f"must be a non-empty string, got {request_id!r}")
        _require(request_id not in self._active, "request_id", f"{request_id!r} is already in flight")
        room = self.max_model_len - len(ids)
        return Request(
            request_id=request_id, prompt=text, prompt_token_ids=ids, params=params, arrival=0,
            max_tokens=min(params.max_tokens or room, room), generators=self._generators(params),
            eos_ids=self.eos_ids, sink=sink,
        )

    def _prompt_ids(self, prompt) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty; give some text or token ids")
            if self.tokenizer is None:
                raise ValueError("prompt is a string but the engine has no tokenizer; pass token ids")
            return self.tokenizer.encode(prompt, add_special_tokens=True), prompt
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)) or not all(_is_id(t) for t in prompt):
            raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError("prompt is empty; give some text or token ids")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt has token ids {bad[:5]} outside the vocabulary [0, {self.vocab_size})")
        return list(prompt), None

    def _generators(self, params: SamplingParams) -> list[torch.Generator | None]:
        if params.seed is None:
            return [None] * params.n
        gens = []
        for i in range(params.n):
            g = torch.Generator(device=self.device)
            g.manual_seed((params.seed if i == 0 else hash((params.seed, i))) & 0xFFFF_FFFF_FFFF_FFFF)
            gens.append(g)
        return gens

    def _submit(self, request: Request) -> None:
        with self._cv:
            _require(request.request_id not in self._active, "request_id",
                     f"{request.request_id!r} is already in flight")
            request.arrival = next(self._arrivals)
            self._active[request.request_id] = request
            self._inbox.append(request)
            self._cv.notify_all()

    def _drain_inbox(self) -> None:
        """Move new requests into the scheduler and apply aborts."""
        with self._cv:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, set()
        for r in inbox:
            if r.done.is_set():  # failed while it waited in the inbox
                continue
            seq = Sequence(request=r, index=0, token_ids=list(r.prompt_token_ids), text=self._sample_text(r),
                           num_samples=r.params.n, logprobs=self._logprob_list(r))
            r.seqs.append(seq)
            self.scheduler.add(seq)
        for request_id in aborts:
            r = self._active.get(request_id)
            if r is not None and not r.done.is_set():
                for seq in list(r.seqs):
                    self._finish(seq, "abort", None)

    def _sample_text(self, r: Request) -> SampleText:
        return SampleText(self.tokenizer, r.params, r.eos_ids)

    @staticmethod
    def _logprob_list(r: Request):
        return [] if r.params.logprobs is not None else None

    # ------------------------------------------------------------------------------------
    # the step
    # ------------------------------------------------------------------------------------
    def _step(self) -> list[Request]:
        """One scheduling + model step; returns the requests finished (or failed) in it."""
        self._drain_inbox()
        try:
            plan = self.scheduler.schedule()
            if not plan.chunks and self.scheduler.has_work():
                raise RuntimeError("the scheduler could not place any waiting request")
        except Exception as e:  # a bug in scheduling: fail everything rather than spin or hang
            self._fail([s.request for s in self.scheduler.running + self.scheduler.waiting], e)
            plan = StepPlan()
        if plan.chunks:
            try:
                self.cache.copy_pages(plan.copies)
                self._run(plan.chunks)
            except Exception as e:
                self._isolate(plan.chunks, e)
        ended, self._ended = self._ended, []
        return ended

    def _isolate(self, chunks: list[Chunk], error: Exception) -> None:
        """A batched step failed: rerun its chunks one by one and fail only the requests that fail alone.

        Rerunning is safe: a chunk rewrites the same slots, and a sequence that already got its
        token has a chunk that no longer samples.
        """
        if len(chunks) == 1:
            self._fail([chunks[0].seq.request], error)
            return
        for c in chunks:
            if c.seq.status is not Status.RUNNING:
                continue
            try:
                self._run([c])
            except Exception as e:
                self._fail([c.seq.request], e)

    @torch.inference_mode()
    def _run(self, chunks: list[Chunk]) -> None:
        ids, positions = [], []
        for c in chunks:
            ids += c.seq.token_ids[c.start : c.start + c.length]
            positions += range(c.start, c.start + c.length)
        meta = build_metadata([c.length for c in chunks], [c.start + c.length for c in chunks],
                              [c.seq.pages for c in chunks], self.page_size, self.device)
        sampled = [(i, c) for i, c in enumerate(chunks) if c.samples]
        last = [meta.query_start_list[i + 1] - 1 for i, _ in sampled]
        logits = self.model(
            torch.tensor([ids], device=self.device),
            position_ids=torch.tensor([positions], device=self.device),
            cache=self.cache.view(meta, self.backend),
            logits_index=torch.tensor(last, dtype=torch.long, device=self.device),
        )
        for c in chunks:
            self.scheduler.commit(c)
        self._steps += 1
        self._computed += len(ids)
        if sampled:
            self._sample([c for _, c in sampled], logits)

    def _sample(self, chunks: list[Chunk], logits: torch.Tensor) -> None:
        rows, row_logit = [], []
        for j, c in enumerate(chunks):
            seq, r = c.seq, c.seq.request
            for k in range(seq.num_samples):  # > 1 only on a request's first token: n draws
                history = (r.prompt_token_ids, seq.output_ids) if r.params.has_penalties else ([], [])
                rows.append(SampleRow(r.params, r.generators[seq.index + k], *history))
                row_logit.append(j)
        if len(row_logit) != logits.shape[0]:
            logits = logits.index_select(0, torch.tensor(row_logit, device=logits.device))
        tokens, logprobs = self.sampler(logits, rows)
        at = 0
        for c in chunks:
            seq = c.seq
            targets = [seq]
            if seq.num_samples > 1:
                n, seq.num_samples = seq.num_samples, 1
                for k in range(1, n):
                    child = self.scheduler.fork(seq, k, self._sample_text(seq.request))
                    child.logprobs = self._logprob_list(seq.request)
                    seq.request.seqs.append(child)
                    targets.append(child)
            for target in targets:
                self._append(target, tokens[at], logprobs[at])
                at += 1
        self._generated += at
        self._recent.append((time.perf_counter(), at))
        while self._recent and self._recent[-1][0] - self._recent[0][0] > _RATE_WINDOW_S:
            self._recent.popleft()

    def _append(self, seq: Sequence, token: int, logprob) -> None:
        seq.token_ids.append(token)
        if seq.logprobs is not None:
            seq.logprobs.append(logprob)
        reason, stop_reason = seq.text.append(token)
        if reason is None and len(seq.token_ids) - seq.num_prompt_tokens >= seq.request.max_tokens:
            reason = "length"
        if reason is not None:
            self._finish(seq, reason, stop_reason)
        else:
            self._emit(seq, None, None)

    # ------------------------------------------------------------------------------------
    # requests out
    # ------------------------------------------------------------------------------------
    def _send(self, r: Request, item) -> None:
        self._outbox.append((r.sink, item))

    def _flush(self) -> None:
        """Deliver what the step produced: one wake-up per asyncio loop per step, not one per event."""
        outbox, self._outbox = self._outbox, []
        by_loop: dict = {}
        for sink, item in outbox:
            if isinstance(sink, _LoopSink):
                by_loop.setdefault(sink.loop, []).append((sink.queue, item))
            else:
                sink(item)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    def _emit(self, seq: Sequence, finish_reason, stop_reason) -> None:
        r = seq.request
        final = finish_reason is not None
        if r.sink is None:
            if final:
                seq.text.delta(final=True)  # flush the decoder into seq.text.text
            return
        text = seq.text.delta(final=final)
        out = seq.output_ids
        new = out[seq.num_streamed :]
        logprobs = seq.logprobs[seq.num_streamed :] if seq.logprobs is not None else None
        seq.num_streamed = len(out)
        self._send(r, StreamEvent(r.request_id, seq.index, text, new, logprobs, finish_reason, stop_reason,
                                  len(r.prompt_token_ids), len(out), self.weights_version))

    def _finish(self, seq: Sequence, reason: str, stop_reason) -> None:
        """End seq (and, before its first token, the samples it would have forked)."""
        r = seq.request
        self.scheduler.remove(seq)
        r.seqs.remove(seq)
        self._emit(seq, reason, stop_reason)
        r.samples[seq.index] = Sample(seq.index, seq.output_ids, seq.text.text, reason, stop_reason, seq.logprobs)
        for k in range(1, seq.num_samples):
            idx = seq.index + k
            r.samples[idx] = Sample(idx, [], "", reason, stop_reason, self._logprob_list(r))
            if r.sink is not None:
                self._send(r, StreamEvent(r.request_id, idx, "", [], r.samples[idx].logprobs, reason, stop_reason,
                                          len(r.prompt_token_ids), 0, self.weights_version))
        if r.finished:
            self._complete(r)

    def _complete(self, r: Request) -> None:
        r.weights_version = self.weights_version
        r.completion = Completion(r.request_id, r.prompt_token_ids, list(r.samples), r.prompt, self.weights_version)
        with self._cv:
            self._active.pop(r.request_id, None)
        self._ended.append(r)
        r.done.set()
        if r.sink is not None:
            self._send(r, _END)

    def _fail(self, requests: list[Request], error: Exception) -> None:
        for r in dict.fromkeys(requests):
            if r.done.is_set():
                continue
            for seq in list(r.seqs):
                self.scheduler.remove(seq)
                r.samples[seq.index] = Sample(seq.index, seq.output_ids, seq.text.text, "abort", None, seq.logprobs)
            r.seqs.clear()
            r.error = EngineError(f"request {r.request_id!r} failed in an engine step: {error!r}")
            r.error.__cause__ = error
            for i, sample in enumerate(r.samples):
                if sample is None:
                    r.samples[i] = Sample(i, [], "", "abort")
            r.completion = Completion(r.request_id, r.prompt_token_ids, list(r.samples), r.prompt,
                                      self.weights_version, error=str(r.error))
            with self._cv:
                self._active.pop(r.request_id, None)
            self._ended.append(r)
            r.done.set()
            if r.sink is not None:
                self._send(r, r.error)

    # ------------------------------------------------------------------------------------
    # threads
    # ------------------------------------------------------------------------------------
    def _thread_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._stopping or self._inbox or self._aborts or self._busy):
                    self._cv.wait()
                if self._stopping:
                    return
            with self._step_lock:
                self._guarded_step()
                self._busy = self.scheduler.has_work()

    def _guarded_step(self) -> list[Request]:
        try:
            return self._step()
        except Exception as e:  # a bug outside the guarded parts of a step: end everything, keep serving
            self._fail(list(self._active.values()), e)
            ended, self._ended = self._ended, []
            return ended
        finally:
            self._flush()

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
                        self._guarded_step()
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
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not request.done.is_set():
                self.abort(request.request_id)

    async def _aiterate(self, request: Request) -> AsyncIterator[StreamEvent]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        request.sink = _LoopSink(loop, events)
        self._submit(request)
        self.start()
        try:
            while True:
                item = await events.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not request.done.is_set():
                self.abort(request.request_id)

    # ------------------------------------------------------------------------------------
    # set-up helpers
    # ------------------------------------------------------------------------------------
    def _pool_size(self, num_pages, kv_cache_memory, per_page, page_size, max_batch_size, max_model_len) -> int:
        if num_pages is not None:
            _require(isinstance(num_pages, int) and num_pages >= 1, "num_pages",
                     f"must be a positive integer, got {num_pages!r}")
            _require(kv_cache_memory is None, "kv_cache_memory", "cannot be combined with num_pages; give one")
            return num_pages
        if kv_cache_memory is not None:
            budget = parse_bytes(kv_cache_memory)
            _require(budget >= per_page, "kv_cache_memory",
                     f"({budget} bytes) is smaller than one KV page ({per_page} bytes)")
            return budget // per_page
        wanted = max_batch_size * -(-max_model_len // page_size)
        if self.device.type == "cuda":
            cap = int(0.9 * torch.cuda.mem_get_info(self.device)[0]) // per_page
        else:
            cap = 2**30 // per_page
        return max(1, min(wanted, cap))

    @staticmethod
    def _check_state(own: dict, state: dict) -> None:
        missing = set(own) - set(state)
        # Tied weights (lm_head sharing the embedding) may be sent once.
        by_storage = {}
        for name, t in own.items():
            by_storage.setdefault(t.data_ptr(), []).append(name)
        missing = {m for m in missing if not any(o in state for o in by_storage[own[m].data_ptr()])}
        unexpected = set(state) - set(own)
        shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                  for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or shapes:
            raise ValueError(
                "update_weights: the weights do not match the served model; "
                f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}, shape mismatches {shapes[:5]}"
            )


@dataclasses.dataclass(frozen=True)
class _LoopSink:
    """Where an asyncio consumer's events go: its queue, filled from inside its loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in items:
        q.put_nowait(item)


def parse_bytes(value: int | str) -> int:
    """2147483648, "2GiB", "512 MiB", "1.5GB" -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"kv_cache_memory must be a positive byte count or a size like '2GiB' / '512MB', got {value!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _config_eos(config) -> list[int]:
    eos = config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name} {message}")
