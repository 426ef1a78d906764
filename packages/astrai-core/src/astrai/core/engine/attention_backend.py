"""Attention over the paged KV cache for one flattened step.

A step runs the new tokens of every scheduled sequence as one row (varlen). The metadata
says where each sequence's queries sit in that row, how long its context is, and which
pages hold its keys. A backend turns queries plus the page pool into attention outputs;
`TorchPagedAttention` is plain PyTorch (the CPU path); `KernelPagedAttention` calls the
Triton kernel of `astrai.core.kernels` on CUDA. Another kernel (FlexAttention, ...) plugs in
by implementing the same two methods, `prepare` and `__call__`.

Gemma 2's sliding layers pass `window` (a query sees only the last `window` keys up to its own)
and its soft-capped attention `softcap` (scores s -> softcap * tanh(s / softcap) before the
softmax); both backends honour them, and layers pass them only when set. Pages that fell out of
every window stay allocated: correctness first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..attention_ops import attention, causal_mask
from .device_transfer import to_device
from .kv_dtype import as_bytes


@dataclass
class AttentionMetadata:
    """Per-step layout, shared by every layer.

    slot_mapping (T,): flat pool slot (page * page_size + offset) of each new token.
    positions (T,): absolute position of each new token in its sequence.
    query_start (B + 1,): where each sequence's new tokens begin in the flattened row.
    context_lens (B,): tokens each sequence attends to, the new ones included; 0 for a padding
        row (bucketed decode), which attends to nothing.
    page_table (B, max_pages): each sequence's pages in order; entries past a sequence's last
        page are never read (0, or stale in the static decode buffers).
    The *_list fields hold the same numbers as Python ints, for backends that loop.
    blocks: optional (sequence, query block) program list for the Triton kernel, whose launch
    then depends on the list's length only (prefill_graphs.py); other backends ignore it.
    """

    slot_mapping: torch.Tensor
    query_start: torch.Tensor
    context_lens: torch.Tensor
    page_table: torch.Tensor
    page_size: int
    query_start_list: list[int]
    context_lens_list: list[int]
    max_query_len: int
    positions: torch.Tensor | None = None
    blocks: tuple[torch.Tensor, torch.Tensor] | None = None


class AttentionBackend(Protocol):
    # True when prepare and __call__ launch only device work whose shapes depend on nothing but
    # the batch size and max_query_len (no host reads of the metadata): a CUDA graph can then
    # capture a decode step once and replay it for any contents of the metadata tensors.
    graph_safe: bool

    def prepare(self, meta: AttentionMetadata) -> Any:
        """Work done once per step (index tensors, kernel plans); passed to every call."""
        ...

    def __call__(
        self,
        q: torch.Tensor,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor | None,
        state: Any,
        scale: float,
        v_dim: int,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """q (T, H, Dk); k_pool (pages, page_size, Hkv, Dk); v_pool likewise with Dv, or None when
        the values are the first v_dim channels of the keys (MLA) -> (T, H, Dv). window, softcap:
        see the module docstring."""
        ...


def build_metadata(
    query_lens: list[int],
    context_lens: list[int],
    pages: list[list[int]],
    page_size: int,
    device,
    extra: list[torch.Tensor] = (),
) -> tuple[AttentionMetadata, list[torch.Tensor]]:
    """Metadata for sequences whose new tokens are the last query_lens[i] of context_lens[i].

    Computed on the host and moved in one transfer, together with the int64 host tensors in
    `extra` (the step's token ids, say); returns the metadata and extra's device copies.
    """
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    width = max(len(p) for p in pages)
    table = torch.tensor([p + [0] * (width - len(p)) for p in pages], dtype=torch.long)
    ctx = torch.tensor(context_lens, dtype=torch.long)
    qlen = torch.tensor(query_lens, dtype=torch.long)
    first = ctx - qlen  # position of each sequence's first new token
    if starts[-1] == len(query_lens):  # one token per sequence (decode): no per-token expansion
        pos = first
        slots = table.gather(1, (pos // page_size)[:, None])[:, 0] * page_size + pos % page_size
    else:
        seq_of_token = torch.repeat_interleave(torch.arange(len(query_lens)), qlen)
        offset = torch.arange(starts[-1]) - torch.tensor(starts[:-1], dtype=torch.long)[seq_of_token]
        pos = first[seq_of_token] + offset
        slots = table[seq_of_token, pos // page_size] * page_size + pos % page_size
    moved = to_device([slots, pos, torch.tensor(starts, dtype=torch.long), ctx, table, *extra], device)
    meta = AttentionMetadata(
        slot_mapping=moved[0],
        positions=moved[1],
        query_start=moved[2],
        context_lens=moved[3],
        page_table=moved[4],
        page_size=page_size,
        query_start_list=starts,
        context_lens_list=list(context_lens),
        max_query_len=max(query_lens),
    )
    return meta, moved[5:]


@dataclass
class _TorchPlan:
    decode_tokens: torch.Tensor | None  # (Bd,) row positions of one-token sequences
    decode_slots: torch.Tensor | None  # (Bd, L) slots of their contexts, padded
    decode_mask: torch.Tensor | None  # (Bd, 1, 1, L) True where the slot is part of the context
    decode_lens: torch.Tensor | None  # (Bd, 1, 1, 1) their context lengths, for a window's start
    prefills: list[tuple[int, int, torch.Tensor]]  # (query start, query length, context slots)
    has_padding: bool = False  # rows with an empty context, whose output is zero


class TorchPagedAttention:
    """Gather each sequence's keys/values from its pages and run SDPA.

    One-token (decode) sequences are batched into a single padded SDPA call; sequences with
    several new tokens (prefill chunks) get one causal call each, with their earlier context
    in front. Padding rows (context 0) get zeros. The plan reads the metadata's host lists, so
    a CUDA graph cannot capture it.
    """

    graph_safe = False

    def prepare(self, meta: AttentionMetadata) -> _TorchPlan:
        starts, ctx, ps = meta.query_start_list, meta.context_lens_list, meta.page_size
        decode = [i for i in range(len(ctx)) if starts[i + 1] - starts[i] == 1 and ctx[i] > 0]
        prefill = [i for i in range(len(ctx)) if starts[i + 1] - starts[i] > 1]
        device = meta.slot_mapping.device
        plan = _TorchPlan(None, None, None, None, [], has_padding=0 in ctx)
        if decode:
            rows = torch.tensor(decode, device=device)
            width = max(ctx[i] for i in decode)
            pos = torch.arange(width, device=device)
            table = meta.page_table.index_select(0, rows)
            plan.decode_slots = table.gather(1, (pos // ps).expand(len(decode), -1)) * ps + pos % ps
            plan.decode_lens = meta.context_lens.index_select(0, rows)[:, None, None, None]
            plan.decode_mask = pos < plan.decode_lens
            plan.decode_tokens = meta.query_start.index_select(0, rows)
        for i in prefill:
            pos = torch.arange(ctx[i], device=device)
            slots = meta.page_table[i, pos // ps] * ps + pos % ps
            plan.prefills.append((starts[i], starts[i + 1] - starts[i], slots))
        return plan

    def __call__(
        self, q, k_pool, v_pool, plan: _TorchPlan, scale: float, v_dim: int, window=None, softcap=None
    ) -> torch.Tensor:
        k_pool = k_pool.flatten(0, 1)  # (slots, Hkv, Dk)
        v_pool = k_pool[..., :v_dim] if v_pool is None else v_pool.flatten(0, 1)
        out = (q.new_zeros if plan.has_padding else q.new_empty)(q.shape[0], q.shape[1], v_dim)
        if plan.decode_tokens is not None:
            qd = q.index_select(0, plan.decode_tokens).unsqueeze(2)  # (Bd, H, 1, Dk)
            kd = _gather(k_pool, plan.decode_slots, q.dtype).transpose(1, 2)  # (Bd, Hkv, L, Dk)
            vd = _gather(v_pool, plan.decode_slots, q.dtype).transpose(1, 2)
            mask = plan.decode_mask
            if window is not None:  # the one query sits at position len - 1 and sees keys from len - window
                mask = mask & (torch.arange(mask.shape[-1], device=q.device) >= plan.decode_lens - window)
            od = attention(qd, kd, vd, mask, scale, softcap)
            out.index_copy_(0, plan.decode_tokens, od.squeeze(2))
        for start, n, slots in plan.prefills:
            qp = q[start : start + n].transpose(0, 1).unsqueeze(0)  # (1, H, n, Dk)
            kp = _gather(k_pool, slots, q.dtype).transpose(0, 1).unsqueeze(0)  # (1, Hkv, L, Dk)
            vp = _gather(v_pool, slots, q.dtype).transpose(0, 1).unsqueeze(0)
            ctx = slots.shape[0]
            # Query i sits at position ctx - n + i and sees keys up to there (the last `window` of them).
            mask = None if ctx == n and window is None else causal_mask(n, ctx, window, q.device)
            op = attention(qp, kp, vp, mask, scale, softcap, is_causal=mask is None)
            out[start : start + n] = op.squeeze(0).transpose(0, 1)
        return out


def _gather(pool: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """pool[slots] for a (slots, ...) pool, in `dtype` (an fp8 pool is read back into the model's
    dtype); index_select is several times faster than fancy indexing on CPU."""
    rows = as_bytes(pool).index_select(0, slots.reshape(-1)).view(pool.dtype)
    return rows.view(*slots.shape, *pool.shape[1:]).to(dtype)


class KernelPagedAttention:
    """The fused Triton kernel (astrai.core.kernels.paged_attention); reads the pages in place.

    Its launch depends only on the batch size, max_query_len (or the length of meta.blocks) and
    the pools' strides, so decode and prefill steps can be captured in CUDA graphs."""

    graph_safe = True

    def prepare(self, meta: AttentionMetadata) -> AttentionMetadata:
        return meta

    def __call__(
        self, q, k_pool, v_pool, meta: AttentionMetadata, scale: float, v_dim: int, window=None, softcap=None
    ) -> torch.Tensor:
        from ..kernels.paged_attention import paged_attention

        return paged_attention(
            q,
            k_pool,
            v_pool,
            meta.page_table,
            meta.context_lens,
            meta.query_start,
            scale,
            v_dim=v_dim,
            max_q_len=meta.max_query_len,
            blocks=meta.blocks,
            window=window,
            softcap=softcap,
        )


def default_backend(device: torch.device) -> AttentionBackend:
    return KernelPagedAttention() if device.type == "cuda" else TorchPagedAttention()
