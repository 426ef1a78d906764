"""EngineCore: one step of continuous batching, from a scheduled plan to delivered tokens.

A step flattens the new tokens of every scheduled sequence into one row, runs the model once
with a paged cache view, samples the sequences whose prompt is fully computed, and hands the
new text to each request's sink (request_output.py turns what a token ends or streams into
events, samples and completions). Not thread-safe: InferenceEngine calls it under its lock.

Overlap: reading a step's tokens on the host (stop checks, detokenising, streaming) and
scheduling the next step cost about as much as a large decode step on the GPU. So a decode
step through the DecodeRunner leaves its sampled tokens on the device ("in flight"); the next
step, when it is again a pure decode of the same sequences, is scheduled and launched first,
feeding on those device tokens, and only then are they read. A sequence that turns out to have
stopped wasted one row of that step; nothing it computed is kept. Anything else (prefill,
admission, forks, penalties that count output tokens) first reads the tokens in flight.

Multi-step decoding (num_scheduler_steps K > 1): even overlapped, a step of hundreds of
sequences costs the host more than the GPU (scheduling, inputs, sampling, stop checks: Python
per sequence), so large decode batches ran at the host's pace. When every running sequence is
a plain decode and nobody waits for a slot, one scheduling launches up to K steps back to back:
pages for all of them are reserved first, each step after the first feeds on the tokens the
one before drew and moves its positions on the device (DecodeRunner.run_steps), the sampler's
per-row numbers cross once (sampler.StepDraws), and the host reads the K tokens of every
sequence in one go. A sequence that stops inside the group wastes the rest of its rows.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque

import torch

from .attention_backend import AttentionBackend, build_metadata
from .cuda_graphs import DecodeRunner
from .device_transfer import to_device
from .host_settings import own_numerics
from .outputs import TokenLogprob
from .paged_cache import PagedKVCache
from .prefill_graphs import PrefillRunner
from .request_output import END as END  # END and LoopSink were defined here: still importable from here
from .request_output import LoopSink as LoopSink
from .request_output import RequestOutput, logprob_list
from .sampler import Drawn, Sampler, SampleRow, multi_step_ready
from .scheduler import Chunk, Scheduler, StepPlan, is_decode
from .sequence import Request, Sequence, Status
from .stop import SampleText
from .structured_output import Grammars

_RATE_WINDOW_S = 10.0


class DecodeTiming:
    """Wall time of pure decode steps, per batch size: what the decode bandwidth floor is compared to."""

    def __init__(self) -> None:
        self.by_batch: dict[int, list] = {}  # batch -> [steps, seconds, context tokens read]

    def add(self, chunks: list[Chunk], seconds: float, steps: int = 1) -> None:
        """`steps` decode steps of the chunks (a multi-step group) took `seconds`."""
        entry = self.by_batch.setdefault(len(chunks), [0, 0.0, 0])
        entry[0] += steps
        entry[1] += seconds
        # Step j reads start + j + 1 tokens of each sequence's context.
        entry[2] += steps * (sum(c.start for c in chunks) + len(chunks)) + len(chunks) * steps * (steps - 1) // 2


@dataclasses.dataclass
class InFlight:
    """A step whose sampled tokens the host has not read yet."""

    seqs: list[Sequence]
    counts: list[int]  # rows of the draw per sequence (n on a request's first token)
    drawn: Drawn
    rows: dict[Sequence, int]  # the row of each sequence's token in drawn.tokens, for the next step to feed on


class EngineCore:
    def __init__(
        self,
        model,
        tokenizer,
        cache: PagedKVCache,
        scheduler: Scheduler,
        backend: AttentionBackend,
        device: torch.device,
    ):
        self.model, self.tokenizer, self.cache, self.scheduler = model, tokenizer, cache, scheduler
        self.backend, self.device = backend, device
        self.sampler = Sampler(tokenizer.vocab_size if tokenizer is not None else None)
        self.weight_updates = 0  # load_weights calls (a trainer's pushes; not reset by reset_stats)
        self.num_steps = self.num_computed = self.num_generated = 0
        self.num_overlapped = 0  # steps launched while the previous step's tokens were in flight
        self.num_grouped = 0  # decode steps launched in multi-step groups (num_scheduler_steps)
        self.num_aborted = 0  # requests stopped by abort() (a client that left, a shutdown)
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens generated) per step
        self.output = RequestOutput(scheduler)  # events, finished samples and completions (request_output.py)
        self.decode_runner: DecodeRunner | None = None  # static-buffer (CUDA-graph) path for decode steps
        self.prefill_runner: PrefillRunner | None = None  # the same for prefill and mixed steps
        self.decode_timing = DecodeTiming()
        self.overlap = True  # runner decode steps leave their tokens in flight (module doc)
        self.num_scheduler_steps = 1  # most decode steps one scheduling launches (module doc)
        self._inflight: InFlight | None = None
        self.grammars: Grammars | None = None  # set by InferenceEngine (structured_output.py)

    # -- requests in ---------------------------------------------------------------------
    def add(self, r: Request) -> None:
        seq = Sequence(
            request=r,
            index=0,
            token_ids=list(r.prompt_token_ids),
            text=self._sample_text(r),
            num_samples=r.params.n,
            logprobs=logprob_list(r),
        )
        if r.params.structured_output is not None:
            seq.matcher = self.grammars.matcher(r.params.structured_output)
        r.seqs.append(seq)
        self.scheduler.add(seq)

    def abort(self, r: Request) -> None:
        self.num_aborted += 1
        for seq in list(r.seqs):
            self.output.finish(seq, "abort", None)

    def take_ended(self) -> list[Request]:
        return self.output.take_ended()

    # -- the step --------------------------------------------------------------------------
    def step(self) -> None:
        """Schedule and run one step; what it ends is collected for take_ended()."""
        start = time.perf_counter()
        if self._inflight is not None and not self._can_overlap():
            self.drain()
        decode_only = self._inflight is not None
        try:
            plan = self.scheduler.schedule(decode_only=decode_only)
            if not plan.chunks and self.scheduler.has_work() and not decode_only:
                raise RuntimeError("the scheduler could not place any waiting request")
        except Exception as e:  # a bug in scheduling: fail everything rather than spin or hang
            self.drain()
            self.fail([s.request for s in self.scheduler.running + self.scheduler.waiting], e)
            plan = StepPlan()
        if not plan.chunks:
            self.drain()  # nothing to launch (say, every sequence's last token is in flight): read them
            return
        decode = is_decode(plan.chunks)
        try:
            steps = self._group_steps(plan) if decode else 1
            self.cache.copy_pages(plan.copies)
            self._run(plan.chunks, decode, steps)
        except Exception as e:
            self.drain()
            self._isolate(plan.chunks, e)
        else:
            if decode:
                self.decode_timing.add(plan.chunks, time.perf_counter() - start, steps)

    def _group_steps(self, plan: StepPlan) -> int:
        """How many decode steps to launch for this pure-decode plan (module doc): up to
        num_scheduler_steps when every chunk is a plain decode through the runner, no sequence
        would pass its max_tokens and nobody waits for a slot; pages for every step are then
        reserved here (a shortage of pages gives one step)."""
        most, runner, s = self.num_scheduler_steps, self.decode_runner, self.scheduler
        if most <= 1 or runner is None or not self.overlap or len(plan.chunks) > runner.max_batch_size:
            return 1
        if plan.preempted or (s.waiting and sum(seq.num_samples for seq in s.running) < s.max_batch_size):
            return 1
        room = runner.width * self.cache.page_size
        for c in plan.chunks:
            seq = c.seq
            if seq.matcher is not None or seq.num_samples != 1 or not multi_step_ready(seq.request.params):
                return 1
            left = seq.request.max_tokens - (len(seq.token_ids) + seq.num_inflight - seq.num_prompt_tokens)
            most = min(most, left, room - c.start)
        if most <= 1:
            return 1
        return most if all(s.reserve(c.seq, most, plan) for c in plan.chunks) else 1

    def _can_overlap(self) -> bool:
        """The next step may launch before the tokens in flight are read: it can only be a pure
        decode of sequences whose next input is such a token, and nobody waits for a free slot."""
        s = self.scheduler
        if s.waiting and len(s.running) < s.max_batch_size:
            return False
        return all(seq.num_pending == 1 and _overlappable(seq) for seq in s.running)

    def drain(self) -> None:
        """Read the tokens in flight, if any (their stop checks, streams and finishes happen here)."""
        if self._inflight is not None:
            inflight, self._inflight = self._inflight, None
            self._resolve(inflight)

    def _isolate(self, chunks: list[Chunk], error: Exception) -> None:
        """A batched step failed: rerun its chunks one by one and fail only the requests that fail alone.

        Rerunning is safe: a chunk rewrites the same slots, and a sequence that already got its
        token has a chunk that no longer samples.
        """
        if len(chunks) == 1:
            self.fail([chunks[0].seq.request], error)
            return
        for c in chunks:
            if c.seq.status is not Status.RUNNING:
                continue
            try:
                self._run([c], is_decode([c]))
                self.drain()
            except Exception as e:
                self.fail([c.seq.request], e)

    def _run(self, chunks: list[Chunk], decode: bool, steps: int = 1) -> None:
        """Run the chunks through the model and sample; `decode`: every chunk is one sampled
        token; `steps` > 1: that many decode steps of them (_group_steps said they can)."""
        with torch.inference_mode(), own_numerics(self.device):
            if steps > 1:
                self._run_group(chunks, steps)
            else:
                self._run_chunks(chunks, decode)

    def _run_group(self, chunks: list[Chunk], steps: int) -> None:
        """`steps` decode steps of the chunks through the runner, their tokens left in flight."""
        feed, feed_rows = self._feed(chunks)
        draws = self.sampler.steps([_sample_row(c, 0) for c in chunks], steps, self.device)
        self.decode_runner.run_steps(chunks, steps, draws.draw, feed, feed_rows)
        for c in chunks:
            if c.seq.status is not Status.FINISHED:  # (a drain can end one)
                self.scheduler.commit(Chunk(c.seq, c.start, steps))
        self.num_steps += steps
        self.num_grouped += steps
        self.num_computed += steps * len(chunks)
        self._hold([c.seq for c in chunks], [1] * len(chunks), draws.finish(), keep=True)

    def _run_chunks(self, chunks: list[Chunk], decode: bool) -> None:
        runner = self.decode_runner
        through_runner = decode and runner is not None and len(chunks) <= runner.max_batch_size
        if through_runner:
            logits, sampled, num_tokens = runner.run(chunks, *self._feed(chunks)), chunks, len(chunks)
        else:
            self.drain()  # prefill and eager steps read every input token on the host
            prefill = self.prefill_runner
            if prefill is not None and prefill.fits(chunks) and not any(_scores_prompt(c) for c in chunks):
                logits, sampled, num_tokens = prefill.run(chunks)
            else:
                logits, sampled, num_tokens = self._forward(chunks)
        for c in chunks:
            if c.seq.status is not Status.FINISHED:  # (a drain can end one)
                self.scheduler.commit(c)
        self.num_steps += 1
        self.num_computed += num_tokens
        if sampled:
            self._draw(sampled, logits, keep=through_runner and self.overlap)

    def _feed(self, chunks: list[Chunk]) -> tuple[torch.Tensor | None, list[int] | None]:
        """The device tokens this decode step feeds on, and each chunk's row in them; (None,
        None) when the host has the input tokens."""
        if self._inflight is None:
            return None, None
        rows = [self._inflight.rows.get(c.seq) for c in chunks]
        if None in rows:  # some input is on the host only: read them all there
            self.drain()
            return None, None
        self.num_overlapped += 1
        return self._inflight.drawn.tokens, rows

    def _forward(self, chunks: list[Chunk]) -> tuple[torch.Tensor, list[Chunk], int]:
        """The eager path (prefill, mixed steps): every chunk's tokens flattened into one row.
        Returns the logits of the sampled chunks' last tokens, those chunks, and the token count;
        the prompt log-probs a chunk's request asked for are read here, from the same forward."""
        ids, last, sampled, scored = [], [], [], []
        for c in chunks:
            offset = len(ids)
            ids += c.seq.token_ids[c.start : c.start + c.length]
            if c.samples:
                last.append(len(ids) - 1)
                sampled.append(c)
            scored += [(c.seq, p, offset + p - c.start) for p in _prompt_positions(c)]
        meta, (ids_t, rows_t) = build_metadata(
            [c.length for c in chunks],
            [c.start + c.length for c in chunks],
            [c.seq.pages for c in chunks],
            self.cache.page_size,
            self.device,
            extra=[torch.tensor(ids), torch.tensor(last + [row for _, _, row in scored], dtype=torch.long)],
        )
        logits = self.model(
            ids_t.view(1, -1),
            position_ids=meta.positions.view(1, -1),
            cache=self.cache.view(meta, self.backend),
            logits_index=rows_t,
        )
        if scored:
            self._score_prompt(scored, logits[len(last) :])
        return logits[: len(last)], sampled, len(ids)

    def _score_prompt(self, scored: list[tuple[Sequence, int, int]], logits: torch.Tensor) -> None:
        """Append each scored position's next prompt token's log-prob (and top alternatives) to
        its request, in the model's raw distribution as sampled logprobs are."""
        lp = logits.float().log_softmax(-1)
        targets = torch.tensor([seq.token_ids[p + 1] for seq, p, _ in scored], device=lp.device)
        chosen = lp.gather(1, targets[:, None])[:, 0].tolist()
        k_max = min(max(seq.request.params.prompt_logprobs for seq, _, _ in scored), lp.shape[-1])
        top_v, top_i = lp.topk(k_max, dim=-1) if k_max else (lp[:, :0], lp[:, :0].long())
        top_v, top_i = top_v.tolist(), top_i.tolist()
        for j, (seq, p, _) in enumerate(scored):
            k = seq.request.params.prompt_logprobs
            top = list(zip(top_i[j][:k], top_v[j][:k]))
            seq.request.prompt_logprobs.append(TokenLogprob(seq.token_ids[p + 1], chosen[j], top))

    def _draw(self, chunks: list[Chunk], logits: torch.Tensor, keep: bool) -> None:
        """Queue the draw of the chunks' next tokens, then read the previous step's tokens; the
        new ones stay in flight if `keep` allows and nothing needs them on the host now."""
        seqs = [c.seq for c in chunks]
        counts = [seq.num_samples for seq in seqs]
        if all(n == 1 for n in counts):
            rows = [_sample_row(c, 0) for c in chunks]
        else:  # a request's first token with n > 1: n draws from its one row of logits
            rows, row_logit = [], []
            for j, c in enumerate(chunks):
                for k in range(c.seq.num_samples):
                    rows.append(_sample_row(c, k))
                    row_logit.append(j)
            (index,) = to_device([torch.tensor(row_logit)], logits.device)
            logits = logits.index_select(0, index)
        if any(seq.matcher is not None for seq in seqs):
            # A mask needs the grammar to have seen the previous token: read the tokens in
            # flight now (this step's forward is already queued on the device), then mask.
            self.drain()
            live = [None if seq.status is Status.FINISHED else seq.matcher for seq in seqs]  # (a drain can end one)
            matchers = [m for m, n in zip(live, counts) for _ in range(n)]
            self.grammars.apply(logits, matchers)
        self._hold(seqs, counts, self.sampler.draw(logits, rows), keep)

    def _hold(self, seqs: list[Sequence], counts: list[int], drawn: Drawn, keep: bool) -> None:
        """Put the queued draw in flight and read the previous one; read this one too unless
        `keep` allows and every sequence can go on without the host having its tokens."""
        for seq in seqs:
            seq.num_inflight += drawn.steps
        keep = keep and all(_overlappable(seq) for seq in seqs)
        previous, self._inflight = self._inflight, InFlight(seqs, counts, drawn, {s: i for i, s in enumerate(seqs)})
        if previous is not None:
            self._resolve(previous)
        if not keep:
            self.drain()

    def _resolve(self, inflight: InFlight) -> None:
        """Hand the sampled tokens of a step (or of a multi-step group) to their sequences."""
        if inflight.drawn.steps > 1:
            self._resolve_group(inflight)
            return
        tokens, logprobs = inflight.drawn.result()
        at = dropped = 0
        for seq, n in zip(inflight.seqs, inflight.counts):
            seq.num_inflight -= 1
            if seq.status is Status.FINISHED:  # ended while its token was computed: drop it
                at += n
                dropped += n
                continue
            if n == 1:
                self._append(seq, tokens[at], logprobs[at])
                at += 1
            else:
                for target in self._fork(seq):
                    self._append(target, tokens[at], logprobs[at])
                    at += 1
            if seq.status is Status.RUNNING:
                self.scheduler.register(seq)  # pages that held this token can now be hashed
        self._count_generated(at - dropped)

    def _resolve_group(self, inflight: InFlight) -> None:
        """Hand each sequence its tokens of a multi-step group, in order, up to where it stops."""
        results = inflight.drawn.results()
        generated = 0
        for i, seq in enumerate(inflight.seqs):
            seq.num_inflight -= len(results)
            for tokens, logprobs in results:
                if seq.status is Status.FINISHED:  # stopped earlier in the group, or before it
                    break
                self._append(seq, tokens[i], logprobs[i])
                generated += 1
            if seq.status is Status.RUNNING:
                self.scheduler.register(seq)
        self._count_generated(generated)

    def _count_generated(self, tokens: int) -> None:
        self.num_generated += tokens
        self._recent.append((time.perf_counter(), tokens))
        while self._recent and self._recent[-1][0] - self._recent[0][0] > _RATE_WINDOW_S:
            self._recent.popleft()

    def _fork(self, seq: Sequence) -> list[Sequence]:
        """seq and, on a request's first token, the n - 1 samples forked from it."""
        targets = [seq]
        n, seq.num_samples = seq.num_samples, 1
        for k in range(1, n):
            child = self.scheduler.fork(seq, k, self._sample_text(seq.request))
            child.logprobs = logprob_list(seq.request)
            if seq.matcher is not None:  # before the parent's matcher takes its own first token
                child.matcher = seq.matcher.deep_copy()
            seq.request.seqs.append(child)
            targets.append(child)
        return targets

    def _append(self, seq: Sequence, token: int, logprob) -> None:
        seq.token_ids.append(token)
        if seq.logprobs is not None:
            seq.logprobs.append(logprob)
        reason, stop_reason = seq.text.append(token)
        if seq.matcher is not None and reason is None:
            seq.matcher.consume_token(token)
            if seq.matcher.is_stopped() or seq.matcher.is_error():  # the grammar is complete
                reason = "stop"
        if reason is None and len(seq.token_ids) - seq.num_prompt_tokens >= seq.request.max_tokens:
            reason = "length"
        if reason is not None:
            self.output.finish(seq, reason, stop_reason)
        else:
            self.output.emit(seq, None, None)

    def _sample_text(self, r: Request) -> SampleText:
        return SampleText(self.tokenizer, r.params, r.eos_ids)

    # -- requests out (request_output.py) ---------------------------------------------------
    def fail(self, requests: list[Request], error: Exception) -> None:
        """End requests with an EngineError; their samples keep what they had and end with "abort"."""
        self.output.fail(requests, error)

    def flush(self) -> None:
        """Deliver what the step produced: one wake-up per asyncio loop per step, not one per event."""
        self.output.flush()

    @property
    def weights_version(self) -> int:
        """The version of the weights loaded last (what events and completions carry)."""
        return self.output.weights_version

    # -- weights and numbers -----------------------------------------------------------------
    @torch.no_grad()
    def load_weights(self, state: dict[str, torch.Tensor], version: int, recompute: bool = False) -> None:
        self.drain()  # tokens in flight came from the old weights and say so
        own = self.model.state_dict()
        for name, tensor in state.items():
            own[name].copy_(tensor)
        self.scheduler.reset_prefix_cache()
        if recompute:
            self.scheduler.recompute_running()
        self.output.weights_version = version
        self.weight_updates += 1

    def reset_stats(self) -> None:
        """Forget the counters, the scheduler's prefix-cache hits included (after warm-up requests)."""
        self.num_steps = self.num_computed = self.num_generated = self.num_overlapped = self.num_grouped = 0
        self.num_aborted = 0
        self.scheduler.lookup_tokens = self.scheduler.hit_tokens = 0
        self._recent.clear()
        self.decode_timing = DecodeTiming()
        for runner in (self.decode_runner, self.prefill_runner):
            if runner is not None:
                runner.num_steps = 0

    def tokens_per_s(self) -> float:
        now = time.perf_counter()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= _RATE_WINDOW_S]
        span = now - recent[0][0] if recent else 0.0
        return sum(n for _, n in recent) / span if span > 0 else 0.0


def _sample_row(chunk: Chunk, k: int) -> SampleRow:
    """The sampler's row for draw k of the chunk's sequence (k > 0 only for the forks of a first
    token); the token it draws lands at position chunk.start + chunk.length."""
    seq, r = chunk.seq, chunk.seq.request
    seed, position = r.sample_seeds[seq.index + k], chunk.start + chunk.length
    if r.params.has_penalties:
        return SampleRow(r.params, seed, r.prompt_token_ids, seq.output_ids, position)
    return SampleRow(r.params, seed, [], [], position)


def _overlappable(seq: Sequence) -> bool:
    """A sequence whose next step may launch before its last token is read: one sample, and no
    penalties (they count the output tokens on the host)."""
    return seq.num_samples == 1 and not seq.request.params.has_penalties


def _scores_prompt(chunk: Chunk) -> bool:
    """The chunk holds prompt positions whose next token's log-prob its request still wants."""
    return bool(_prompt_positions(chunk))


def _prompt_positions(chunk: Chunk) -> range:
    """Positions of the chunk whose logits give a prompt token's log-prob not yet read: p predicts
    token p + 1, so p < prompt length - 1; a recomputed chunk (after preemption) reads none again."""
    r = chunk.seq.request
    if r.prompt_logprobs is None or chunk.seq.index != 0:
        return range(0)
    first = max(chunk.start, len(r.prompt_logprobs) - 1)
    end = min(chunk.start + chunk.length, len(r.prompt_token_ids) - 1)
    return range(first, end) if first < end else range(0)
