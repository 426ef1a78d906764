"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step gets a token budget. Running sequences go first, oldest first: a decoding one
needs one token, one in the middle of a long prompt gets the next chunk that fits (chunked
prefill). What is left of the budget admits waiting sequences in arrival order, reusing any
cached prefix pages. When the pool runs out of pages the newest running sequence is
preempted: its pages are released (full ones stay in the prefix cache) and it goes back to
the waiting queue to be recomputed later, so nothing crashes and no request is lost. No new
sequence is admitted in a step that had to preempt. A waiting sequence whose next prefix
page is being computed in this very step by another one (a GRPO group, the same system
prompt arriving twice) waits a step and then finds it in the prefix cache.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from .page_allocator import PageAllocator
from .prefix_cache import ROOT_HASH, hash_pages
from .sequence import Sequence, Status


@dataclass
class Chunk:
    """Tokens token_ids[start : start + length] of seq run through the model this step."""

    seq: Sequence
    start: int
    length: int

    @property
    def samples(self) -> bool:
        """True when the chunk reaches the end of the sequence, so its last logits are sampled."""
        return self.start + self.length == len(self.seq.token_ids) + self.seq.num_inflight


def is_decode(chunks: list[Chunk]) -> bool:
    """A pure decode step: every chunk feeds one token and samples the next."""
    return all(c.length == 1 and c.samples for c in chunks)


@dataclass
class StepPlan:
    chunks: list[Chunk] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) pages to copy first
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)


class Scheduler:
    def __init__(self, allocator: PageAllocator, page_size: int, max_batch_size: int, max_num_batched_tokens: int):
        self.allocator = allocator
        self.page_size = page_size
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Sequence] = []  # sorted by Sequence.order
        self.running: list[Sequence] = []  # admission order; the last one is preempted first
        self.epoch = 0  # bumped when the prefix cache is invalidated (new weights)
        self.num_preemptions = 0
        self.num_page_copies = 0
        self.lookup_tokens = 0
        self.hit_tokens = 0

    # -- queue membership ----------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.order)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out of the queues and release its pages."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self._release_pages(seq)
        seq.status = Status.FINISHED

    def fork(self, parent: Sequence, index: int, text) -> Sequence:
        """A new running sample that shares every page of `parent` (copied on first write)."""
        child = Sequence(
            request=parent.request,
            index=index,
            token_ids=list(parent.token_ids),
            text=text,
            status=Status.RUNNING,
            num_computed=parent.num_computed,
            pages=list(parent.pages),
            page_hashes=list(parent.page_hashes),
            num_registered=parent.num_registered,
            epoch=parent.epoch,
        )
        for page in child.pages:
            self.allocator.retain(page)
        at = self.running.index(parent) + 1
        while at < len(self.running) and self.running[at].request is parent.request:
            at += 1
        self.running.insert(at, child)
        return child

    # -- the step plan ---------------------------------------------------------------------
    def schedule(self, decode_only: bool = False) -> StepPlan:
        """The next step. decode_only: just the running sequences (no admission), as when their
        last tokens are still in flight and unknown to the host."""
        plan = StepPlan()
        budget = self.max_num_batched_tokens
        # Decodes need one token each and the budget covers max_batch_size of them. A sequence
        # still in prefill is always the last one admitted (it took the rest of a budget), so
        # it never starves the decodes ahead of it.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_inflight and seq.out_of_tokens:
                i += 1  # ends when its last token is read
                continue
            length = min(seq.num_pending, budget)
            if not self._make_room(seq, length, plan):
                break  # seq was the newest and preempted itself
            plan.chunks.append(Chunk(seq, seq.num_computed, length))
            budget -= length
            i += 1
        if plan.preempted or not self.waiting or decode_only:
            return plan
        inflight = set()  # hashes of pages that become full during this step
        for chunk in plan.chunks:
            self._mark_inflight(chunk, inflight)
        slots = sum(s.num_samples for s in self.running)
        at = 0
        while at < len(self.waiting) and budget > 0:
            seq = self.waiting[at]
            if slots + seq.num_samples > self.max_batch_size:
                break
            if self._next_page_inflight(seq, inflight):
                at += 1
                continue
            length = self._admit(seq, at, budget, plan)
            if length is None:
                break
            chunk = Chunk(seq, seq.num_computed, length)
            plan.chunks.append(chunk)
            self._mark_inflight(chunk, inflight)
            budget -= length
            slots += seq.num_samples
        return plan

    def _mark_inflight(self, chunk: Chunk, inflight: set[int]) -> None:
        full = (chunk.start + chunk.length) // self.page_size
        if full > chunk.seq.num_registered:
            self._extend_hashes(chunk.seq)
            inflight.update(chunk.seq.page_hashes[chunk.seq.num_registered : full])

    def _next_page_inflight(self, seq: Sequence, inflight: set[int]) -> bool:
        """True if the first prefix page seq would have to compute is being computed right now."""
        if not inflight:
            return False
        self._extend_hashes(seq)
        usable = (len(seq.token_ids) - 1) // self.page_size
        hit = len(self.allocator.prefix_cache.lookup(seq.page_hashes[:usable]))
        return hit < usable and seq.page_hashes[hit] in inflight

    def commit(self, chunk: Chunk) -> None:
        """After the forward pass: the chunk's keys/values are in the cache; offer full pages to the prefix cache."""
        chunk.seq.num_computed = chunk.start + chunk.length
        self.register(chunk.seq)

    def register(self, seq: Sequence) -> None:
        """Offer seq's full, computed pages to the prefix cache; a page holding a token still in
        flight waits (its hash needs the token)."""
        full = min(seq.num_computed, len(seq.token_ids)) // self.page_size
        if full <= seq.num_registered:
            return
        self._extend_hashes(seq)
        if seq.epoch == self.epoch:
            for p in range(seq.num_registered, full):
                self.allocator.prefix_cache.insert(seq.page_hashes[p], seq.pages[p])
        seq.num_registered = full

    def recompute_running(self) -> int:
        """Send every running sequence back to the waiting queue with its pages released, as a
        preemption does: its prompt and tokens so far are computed again when it is readmitted
        (after a weight update: its keys/values then come from the new weights). Returns how many."""
        victims, self.running = self.running, []
        for seq in victims:
            self._preempt(seq)
        return len(victims)

    def reset_prefix_cache(self) -> None:
        """Cached pages no longer match the model (new weights): forget them all."""
        self.allocator.clear_prefix_cache()
        self.epoch += 1

    # -- pages ---------------------------------------------------------------------------
    def reserve(self, seq: Sequence, tokens: int, plan: StepPlan) -> bool:
        """Pages for the next `tokens` tokens of seq (a multi-step decode), all or nothing,
        without preempting anyone: False when the pool is short."""
        return self._grow(seq, tokens, plan)

    def _make_room(self, seq: Sequence, length: int, plan: StepPlan) -> bool:
        while not self._grow(seq, length, plan):
            victim = self.running.pop()
            self._preempt(victim)
            plan.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _grow(self, seq: Sequence, length: int, plan: StepPlan) -> bool:
        """Give seq pages for `length` more tokens, all or nothing.

        A partly filled last page shared with a forked sibling is copied before it is written.
        """
        ps, start = self.page_size, seq.num_computed
        needed = max(0, -(-(start + length) // ps) - len(seq.pages))
        shared = start % ps != 0 and self.allocator.refcount[seq.pages[start // ps]] > 1
        if not needed and not shared:  # most decode steps: the token fits in an own page
            return True
        if needed + shared > self.allocator.num_free:
            return False
        if shared:
            old = seq.pages[start // ps]
            seq.pages[start // ps] = new = self.allocator.allocate()
            plan.copies.append((old, new))
            self.num_page_copies += 1
            self.allocator.release(old)
        seq.pages.extend(self.allocator.allocate() for _ in range(needed))
        return True

    def _admit(self, seq: Sequence, at: int, budget: int, plan: StepPlan) -> int | None:
        """Move waiting[at] to running with its cached prefix; None if pages are short."""
        self._extend_hashes(seq)
        # Leave at least one token to compute: its logits give the next token.
        usable = (len(seq.token_ids) - 1) // self.page_size
        if seq.request.prompt_logprobs is not None and len(seq.request.prompt_logprobs) < seq.num_prompt_tokens:
            usable = 0  # the prompt's log-probs come from its own prefill: no cached pages
        hits = self.allocator.prefix_cache.lookup(seq.page_hashes[:usable])
        for page in hits:
            self.allocator.retain(page)
        seq.pages, seq.num_registered = list(hits), len(hits)
        seq.num_computed = len(hits) * self.page_size
        length = min(seq.num_pending, budget)
        if not self._grow(seq, length, plan):
            self._release_pages(seq)
            return None
        self.lookup_tokens += len(seq.token_ids)
        self.hit_tokens += seq.num_computed
        seq.epoch = self.epoch
        self.waiting.pop(at)
        self.running.append(seq)
        seq.status = Status.RUNNING
        return length

    def _preempt(self, seq: Sequence) -> None:
        self._release_pages(seq)
        self.num_preemptions += 1
        self.add(seq)

    def _release_pages(self, seq: Sequence) -> None:
        # Last page first: the LRU then evicts a prefix's tail before its head.
        for page in reversed(seq.pages):
            self.allocator.release(page)
        seq.pages, seq.num_computed, seq.num_registered = [], 0, 0

    def _extend_hashes(self, seq: Sequence) -> None:
        done = len(seq.page_hashes)
        if (len(seq.token_ids) // self.page_size) > done:
            parent = seq.page_hashes[-1] if done else ROOT_HASH
            seq.page_hashes += hash_pages(seq.token_ids, self.page_size, parent, start=done)
