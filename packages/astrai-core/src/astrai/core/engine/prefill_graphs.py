"""Prefill and mixed steps on static buffers, padded to a few token counts, replayed as CUDA graphs.

A step that prefills (alone or beside decode rows) runs some fifteen kernels a layer, and from
Python the host launches them more slowly than the GPU runs them, so a large prefill step took
longer than its GPU work and varied from run to run with the host (measured: see
bench/RESULTS.md, 2026-11-25 host-timing and `diag/ab.py` rows, 2026-11-26
`diag/prof_prefill.py` row). Recorded once per token count and replayed, the step is one
launch. What differs from decode steps (cuda_graphs.py):
- A step of T tokens runs as the smallest token bucket >= T (64, 128, ..., 1024, then multiples
  of 1024, and the token budget). The extra tokens belong to no sequence: their keys and values
  go to the scratch page and nothing reads their outputs.
- Every step has max_batch_size sequence slots; unused slots have no queries and no context.
- The host sends the token ids and a few numbers per sequence in one transfer; each token's
  position and cache slot are worked out on the device, inside the graph.
- The attention kernel takes its programs from a list of (sequence, query block) pairs whose
  length depends on the bucket only (kernels/paged_attention_triton.py); unused entries are -1.
With capture=False the same buffers and padding run eagerly (the CPU path of the tests).
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

from ..kernels.paged_attention import query_block_size
from .attention_backend import AttentionBackend, AttentionMetadata
from .cuda_graphs import capture_graphs
from .paged_cache import PagedKVCache
from .scheduler import Chunk

log = logging.getLogger(__name__)


def token_buckets(max_tokens: int) -> list[int]:
    """Token counts a step is padded to: 64, 128, ..., 1024, multiples of 1024, and max_tokens."""
    small = [n for n in (64, 128, 256, 512, 1024) if n < max_tokens]
    return small + list(range(2048, max_tokens, 1024)) + [max_tokens]


class PrefillRunner:
    """Runs steps of up to max_tokens tokens and max_seqs sequences on static buffers (module doc)."""

    def __init__(
        self,
        model,
        cache: PagedKVCache,
        backend: AttentionBackend,
        max_seqs: int,
        max_tokens: int,
        max_model_len: int,
        capture: bool,
    ):
        self.model, self.cache, self.backend = model, cache, backend
        self.device = cache.k.device
        if capture and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the cache is on {self.device}")
        layout = cache.layout
        self.block_m = query_block_size(model.config.n_heads, layout.n_kv_heads, layout.k_dim)
        self.buckets = token_buckets(max_tokens)
        self.max_seqs, self.max_tokens = max_seqs, max_tokens
        self.width = -(-max_model_len // cache.page_size)
        self._max_blocks = self._blocks_for(max_tokens)
        # One int64 buffer: token ids (max_tokens), query starts (max_seqs + 1), context lengths,
        # the sampled rows, the program list (two fields), then the step's page table rows (B, w).
        s, t, nb = max_seqs, max_tokens, self._max_blocks
        self._offsets = dict(
            ids=0,
            starts=t,
            ctx=t + s + 1,
            last=t + 2 * s + 1,
            seq=t + 3 * s + 1,
            index=t + 3 * s + 1 + nb,
            table=t + 3 * s + 1 + 2 * nb,
        )
        size = self._offsets["table"] + s * self.width
        on_cuda = self.device.type == "cuda"
        self._host = torch.zeros(size, dtype=torch.long, pin_memory=on_cuda)
        self._host_np = self._host.numpy()
        self._dev = torch.zeros(size, dtype=torch.long, device=self.device) if on_cuda else self._host
        o = self._offsets
        self.ids = self._dev[:t]
        self.query_start = self._dev[o["starts"] : o["starts"] + s + 1]
        self.context_lens = self._dev[o["ctx"] : o["ctx"] + s]
        self.last = self._dev[o["last"] : o["last"] + s]
        self.block_seq = self._dev[o["seq"] : o["seq"] + nb]
        self.block_index = self._dev[o["index"] : o["index"] + nb]
        self.page_table = torch.zeros(s, self.width, dtype=torch.long, device=self.device)
        self._copied = torch.cuda.Event() if on_cuda else None  # the last host -> device copy has run
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture_seconds = 0.0
        self.num_steps = 0
        self._write_padding()
        if capture:
            start = time.perf_counter()
            self.graphs = capture_graphs(self.buckets, self._padding_body, self.device)
            self.capture_seconds = time.perf_counter() - start
            log.info("captured CUDA graphs for prefill token counts %s in %.2f s", self.buckets, self.capture_seconds)

    def _blocks_for(self, tokens: int) -> int:
        """Length of the program list of a bucket: enough for any split of `tokens` into max_seqs sequences."""
        return -(-tokens // self.block_m) + self.max_seqs

    def fits(self, chunks: list[Chunk]) -> bool:
        return (
            len(chunks) <= self.max_seqs
            and sum(c.length for c in chunks) <= self.max_tokens
            and max(len(c.seq.pages) for c in chunks) <= self.width
        )

    def bucket(self, tokens: int) -> int:
        return self.buckets[bisect.bisect_left(self.buckets, tokens)]

    # -- the step -------------------------------------------------------------------------
    def run(self, chunks: list[Chunk]) -> tuple[torch.Tensor, list[Chunk], int]:
        """Logits of the sampled chunks' last tokens, those chunks, and the step's token count;
        every chunk's keys/values land in the cache."""
        n, bucket, sampled = self._write_inputs(chunks)
        self.num_steps += 1
        entry = self.graphs.get(bucket)
        if entry is not None:
            entry[0].replay()
            hidden = entry[1]
        else:
            hidden = self._body(bucket, [c.start + c.length for c in chunks])
        rows = self.last[: len(sampled)]
        return self.model.compute_logits(hidden.index_select(0, rows)), sampled, n

    def _write_inputs(self, chunks: list[Chunk]) -> tuple[int, int, list[Chunk]]:
        """Fill the buffers for this step (unused sequence slots and list entries after the live
        ones); returns the token count, its bucket and the chunks that sample."""
        s, o = self.max_seqs, self._offsets
        w = max(len(c.seq.pages) for c in chunks)
        ids, starts, ctx, last, sampled, table, seq_of, index = [], [0], [], [], [], [], [], []
        for b, c in enumerate(chunks):
            seq = c.seq
            ids += seq.token_ids[c.start : c.start + c.length]
            starts.append(len(ids))
            ctx.append(c.start + c.length)
            if c.samples:
                last.append(len(ids) - 1)
                sampled.append(c)
            blocks = -(-c.length // self.block_m)
            seq_of += [b] * blocks
            index += range(blocks)
            table += seq.pages
            if len(seq.pages) < w:
                table += [0] * (w - len(seq.pages))
        n, b, bucket = len(ids), len(chunks), self.bucket(len(ids))
        nb = self._blocks_for(bucket)
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's transfer has read the host buffer
        h = self._host_np
        h[0:n] = ids  # tokens past n keep old (valid) ids: their outputs are never read
        h[o["starts"] : o["starts"] + b + 1], h[o["starts"] + b + 1 : o["starts"] + s + 1] = starts, n
        h[o["ctx"] : o["ctx"] + b], h[o["ctx"] + b : o["ctx"] + s] = ctx, 0
        h[o["last"] : o["last"] + len(last)] = last
        h[o["seq"] : o["seq"] + len(seq_of)], h[o["seq"] + len(seq_of) : o["seq"] + nb] = seq_of, -1
        h[o["index"] : o["index"] + len(index)] = index
        end = o["table"] + b * w
        h[o["table"] : end] = table
        if self._dev is not self._host:
            self._dev[:end].copy_(self._host[:end], non_blocking=True)
            self._copied.record(torch.cuda.current_stream(self.device))
        # Columns past w keep older entries: a row never reads past its own context.
        self.page_table[:b, :w].copy_(self._dev[o["table"] : end].view(b, w))
        return n, bucket, sampled

    def _write_padding(self) -> None:
        """No sequence at all (what the capture runs): every token is padding, every list entry -1."""
        o, s, h = self._offsets, self.max_seqs, self._host_np
        h[o["starts"] : o["starts"] + s + 1] = 0
        h[o["ctx"] : o["ctx"] + s] = 0
        h[o["seq"] : o["seq"] + self._max_blocks] = -1
        if self._dev is not self._host:
            self._dev[: o["table"]].copy_(self._host[: o["table"]], non_blocking=True)
            self._copied.record(torch.cuda.current_stream(self.device))

    def _padding_body(self, bucket: int) -> torch.Tensor:
        return self._body(bucket, [])

    def _body(self, bucket: int, context_lens: list[int]) -> torch.Tensor:
        """Final hidden states (bucket, dim) of the model body over the first `bucket` tokens."""
        positions, slots = self._token_layout(bucket)
        ctx = context_lens + [0] * (self.max_seqs - len(context_lens))
        nb = self._blocks_for(bucket)
        meta = AttentionMetadata(
            slot_mapping=slots,
            positions=positions,
            query_start=self.query_start,
            context_lens=self.context_lens,
            page_table=self.page_table,
            page_size=self.cache.page_size,
            # host lists only for a backend that loops over sequences (never inside a capture)
            query_start_list=[] if getattr(self.backend, "graph_safe", False) else self.query_start.tolist(),
            context_lens_list=ctx,
            max_query_len=bucket,
            blocks=(self.block_seq[:nb], self.block_index[:nb]),
        )
        hidden = self.model.model(
            self.ids[:bucket].view(1, bucket), positions.view(1, bucket), cache=self.cache.view(meta, self.backend)
        )
        return hidden[0]

    def _token_layout(self, bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's position and cache slot, from the per-sequence numbers, on the device;
        tokens past the last sequence's get position 0 and the scratch page."""
        ps, s = self.cache.page_size, self.max_seqs
        tok = torch.arange(bucket, device=self.device)
        ends = self.query_start[1:]
        owner = torch.searchsorted(ends, tok, right=True)  # the first sequence that ends after the token
        real = owner < s
        owner = owner.clamp(max=s - 1)
        begin = self.query_start[owner]
        pos = torch.where(real, self.context_lens[owner] - (ends[owner] - begin) + (tok - begin), 0)
        slots = self.page_table[owner, pos // ps] * ps + pos % ps
        return pos, torch.where(real, slots, self.cache.scratch_page * ps)
