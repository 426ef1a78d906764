"""Decode steps on static buffers, padded to a few batch sizes and replayed as CUDA graphs.

An eager decode step launches some fifty small kernels per layer; at batch sizes that serve
well the GPU then waits on Python. A decode step (every sequence feeds one token and samples
the next) has the same shapes every time for a given batch size, so it can be recorded once
and replayed:

- Inputs live in fixed device buffers sized for the largest batch: token ids, positions, slot
  mapping, context lengths, query starts (an arange) and a page table wide enough for
  max_model_len. A step's integers are packed into one pinned host tensor and copied in one
  asynchronous transfer.
- A step of B sequences runs as the smallest bucket >= B (1, 2, 4, 8, then multiples of 16,
  up to max_batch_size). The extra rows are padding: token 0 at position 0 with context length
  0, so they attend to nothing, and they write their keys/values into the cache's scratch page,
  which the allocator never hands out.
- With capture=True every bucket's forward pass is captured in a torch.cuda.CUDAGraph when the
  runner is built (largest first, all sharing one memory pool, each after a warm-up run). The
  graph outputs the final hidden states; the LM head runs after the replay on the live rows
  only, so no graph holds a (bucket, vocab) logits buffer.
- With capture=False the same buffers and padding run eagerly: the CPU path the tests use to
  prove that padded, bucketed decoding gives the tokens of the plain path.

Weights are read from the parameters' storage at replay time, so in-place weight updates
(EngineCore.load_weights) are seen by the graphs.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable

import torch

from ..rope import rope_kind
from .attention_backend import AttentionBackend, AttentionMetadata
from .host_settings import own_numerics
from .paged_cache import PagedKVCache
from .scheduler import Chunk

log = logging.getLogger(__name__)


def batch_buckets(max_batch_size: int) -> list[int]:
    """Batch sizes a decode step is padded to: 1, 2, 4, 8, multiples of 16, and max_batch_size."""
    small = [b for b in (1, 2, 4, 8) if b < max_batch_size]
    return small + list(range(16, max_batch_size, 16)) + [max_batch_size]


def graph_blocker(model, backend: AttentionBackend) -> str | None:
    """Why decode steps of this model cannot be captured in a CUDA graph, or None if they can."""
    config = model.config
    if not (hasattr(model, "model") and hasattr(model, "compute_logits")):
        return f"{type(model).__name__} is not split into a .model body and compute_logits (the LM head)"
    if config.ffn_type == "moe":
        return "MoE routing gives each expert a data-dependent number of tokens"
    if rope_kind(config) == "dynamic":
        return "dynamic NTK RoPE reads the longest position on the host every step"
    if not getattr(backend, "graph_safe", False):
        return f"the attention backend {type(backend).__name__} is not graph-safe"
    return None


def capture_graphs(
    buckets: list[int], body, device: torch.device
) -> dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]]:
    """{bucket: (graph, output)} of body(bucket) captured for every bucket, largest first, all in
    one memory pool (the smaller ones fit in the largest one's), each after a warm-up run."""
    graphs, pool = {}, None
    # inference_mode: with autograd on, a warm-up would keep every layer's activations alive
    # (GiBs at prefill sizes) and the graphs would record the unpacked training path.
    with torch.cuda.device(device), torch.inference_mode(), own_numerics(device):
        # One side stream for every warm-up: the allocator caches blocks per stream, so a new
        # stream per bucket would keep each warm-up's activations reserved (GiBs for prefill).
        side = torch.cuda.Stream()
        for bucket in sorted(buckets, reverse=True):
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # compiles the kernels and sets up cuBLAS outside the capture
                body(bucket)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: another thread's CUDA calls (a server's intake) do not break the capture.
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                out = body(bucket)
            pool = graph.pool()
            graphs[bucket] = (graph, out)
        torch.cuda.synchronize(device)
    return graphs


class DecodeRunner:
    """Runs decode steps of up to max_batch_size sequences on static buffers (see the module doc)."""

    def __init__(
        self,
        model,
        cache: PagedKVCache,
        backend: AttentionBackend,
        max_batch_size: int,
        max_model_len: int,
        capture: bool,
    ):
        self.model, self.cache, self.backend = model, cache, backend
        self.device = cache.k.device
        if capture and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the cache is on {self.device}")
        self.buckets = batch_buckets(max_batch_size)
        n = self.buckets[-1]
        self.width = -(-max_model_len // cache.page_size)  # pages of the longest sequence
        self._scratch_slot = cache.scratch_page * cache.page_size
        self._zeros = [0] * self.width
        # One int64 buffer: ids, positions, slots and context lengths (a 16-aligned field of n
        # each), then this step's page table rows packed as (B, w). On CUDA a pinned host copy
        # is filled and sent in one transfer; on the CPU the host buffer is the buffer.
        self._field = f = 16 * -(-n // 16)
        size = 4 * f + n * self.width
        on_cuda = self.device.type == "cuda"
        self._host = torch.zeros(size, dtype=torch.long, pin_memory=on_cuda)
        self._host_np = self._host.numpy()
        self._dev = torch.zeros(size, dtype=torch.long, device=self.device) if on_cuda else self._host
        self.ids, self.positions, self.slots, self.context_lens = (self._dev[i * f : i * f + n] for i in range(4))
        self.page_table = torch.zeros(n, self.width, dtype=torch.long, device=self.device)
        self.query_start = torch.arange(n + 1, device=self.device)
        self._copied = torch.cuda.Event() if on_cuda else None  # the last host -> device copy has run
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture_seconds = 0.0
        self.num_steps = 0  # decode steps run here
        # Set to a list to time every replay on the device: (batch, start event, end event) (benchmarks).
        self.replay_events: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] | None = None
        if capture:
            self._capture_all()

    # -- the step -------------------------------------------------------------------------
    @property
    def max_batch_size(self) -> int:
        return self.buckets[-1]

    def bucket(self, batch: int) -> int:
        return self.buckets[bisect.bisect_left(self.buckets, batch)]

    def run(
        self, chunks: list[Chunk], feed: torch.Tensor | None = None, feed_rows: list[int] | None = None
    ) -> torch.Tensor:
        """Logits (len(chunks), vocab) of a decode step (scheduler.is_decode(chunks), at most
        max_batch_size chunks); the keys/values land in the cache.

        With feed, the input tokens are still on the device: chunk i feeds feed[feed_rows[i]]
        (the previous step's sampled tokens), so the host need not have read them."""
        b = len(chunks)
        bucket = self.bucket(b)
        context_lens = self._write_inputs(chunks, bucket, feed_rows)
        if feed is not None:
            self.ids[:b].copy_(feed.index_select(0, self.ids[:b]))
        return self._logits(b, bucket, context_lens)

    def run_steps(
        self,
        chunks: list[Chunk],
        steps: int,
        draw: Callable[[torch.Tensor], torch.Tensor],
        feed: torch.Tensor | None = None,
        feed_rows: list[int] | None = None,
    ) -> None:
        """``steps`` decode steps of the chunks in a row (multi-step decoding), queued without
        waiting: the first as run() runs it, each later one feeding on the tokens the one
        before drew and moving every row one position on, on the device. ``draw(logits)``
        samples a step and returns its tokens (B,). The sequences' pages must already cover
        every position the steps write."""
        b, ps = len(chunks), self.cache.page_size
        bucket = self.bucket(b)
        tokens = draw(self.run(chunks, feed, feed_rows))
        for _ in range(1, steps):
            positions = self.positions[:b]
            positions.add_(1)
            self.context_lens[:b].add_(1)
            pages = self.page_table[:b].gather(1, positions.div(ps, rounding_mode="floor")[:, None])[:, 0]
            self.slots[:b].copy_(pages * ps + positions % ps)
            self.ids[:b].copy_(tokens)
            # The eager body (no graphs: the CPU) reads the context lengths on the host.
            context_lens = None if self.graphs else self.context_lens[:bucket].tolist()
            tokens = draw(self._logits(b, bucket, context_lens))

    def _logits(self, b: int, bucket: int, context_lens: list[int] | None) -> torch.Tensor:
        """The logits of the first b rows of the inputs now in the buffers (bucket rows run)."""
        self.num_steps += 1
        entry = self.graphs.get(bucket)
        if entry is not None:
            self._replay(entry[0], b)
            hidden = entry[1]
        else:
            hidden = self._body(bucket, context_lens)
        return self.model.compute_logits(hidden[:b])

    def _replay(self, graph: torch.cuda.CUDAGraph, batch: int) -> None:
        if self.replay_events is None:
            graph.replay()
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        self.replay_events.append((batch, start, end))

    def _write_inputs(self, chunks: list[Chunk], bucket: int, feed_rows: list[int] | None) -> list[int]:
        """Fill the static buffers for this step (padding rows after the live ones); returns the
        context lengths as ints. With feed_rows, the ids field holds those rows instead of tokens."""
        ps, f, b = self.cache.page_size, self._field, len(chunks)
        w = max(len(c.seq.pages) for c in chunks)
        if w > self.width:
            raise RuntimeError(f"a sequence holds {w} pages but the decode page table has {self.width} columns")
        ids, pos, slots, ctx, table = [], [], [], [], []
        for c in chunks:
            seq, p = c.seq, c.start
            pages = seq.pages
            if feed_rows is None:
                ids.append(seq.token_ids[p])
            pos.append(p)
            ctx.append(p + 1)
            slots.append(pages[p // ps] * ps + p % ps)
            table += pages
            if len(pages) < w:
                table += self._zeros[: w - len(pages)]
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's transfer has read the host buffer
        h, end = self._host_np, 4 * f + b * w
        h[0:b], h[b:bucket] = ids if feed_rows is None else feed_rows, 0
        h[f : f + b], h[f + b : f + bucket] = pos, 0
        h[2 * f : 2 * f + b], h[2 * f + b : 2 * f + bucket] = slots, self._scratch_slot
        h[3 * f : 3 * f + b], h[3 * f + b : 3 * f + bucket] = ctx, 0
        h[4 * f : end] = table
        if self._dev is not self._host:
            self._dev[:end].copy_(self._host[:end], non_blocking=True)
            self._copied.record(torch.cuda.current_stream(self.device))
        # Columns past w keep older entries: a row never reads past its own context.
        self.page_table[:b, :w].copy_(self._dev[4 * f : end].view(b, w))
        return ctx + [0] * (bucket - b)

    def _body(self, bucket: int, context_lens: list[int]) -> torch.Tensor:
        """Final hidden states (bucket, dim) of the model body over the first `bucket` rows."""
        meta = AttentionMetadata(
            slot_mapping=self.slots[:bucket],
            positions=self.positions[:bucket],
            query_start=self.query_start[: bucket + 1],
            context_lens=self.context_lens[:bucket],
            page_table=self.page_table[:bucket],
            page_size=self.cache.page_size,
            query_start_list=list(range(bucket + 1)),
            context_lens_list=context_lens,
            max_query_len=1,
        )
        hidden = self.model.model(
            self.ids[:bucket].view(1, bucket),
            self.positions[:bucket].view(1, bucket),
            cache=self.cache.view(meta, self.backend),
        )
        return hidden[0]

    # -- capture ----------------------------------------------------------------------------
    def _capture_all(self) -> None:
        start = time.perf_counter()
        # Every row a padding row: warm-up and capture runs write only the scratch page.
        self._write_padding()
        self.graphs = capture_graphs(self.buckets, lambda bucket: self._body(bucket, [0] * bucket), self.device)
        self.capture_seconds = time.perf_counter() - start
        log.info("captured CUDA graphs for decode batch sizes %s in %.2f s", self.buckets, self.capture_seconds)

    def _write_padding(self) -> None:
        f, n = self._field, self.buckets[-1]
        h = self._host_np
        h[0:n], h[f : f + n], h[2 * f : 2 * f + n], h[3 * f : 3 * f + n] = 0, 0, self._scratch_slot, 0
        if self._dev is not self._host:
            self._dev[: 4 * f].copy_(self._host[: 4 * f], non_blocking=True)
            self._copied.record(torch.cuda.current_stream(self.device))
