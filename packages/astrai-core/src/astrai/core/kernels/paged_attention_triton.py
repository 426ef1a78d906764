"""Triton flash-attention over a paged KV cache (varlen queries, causal, GQA/MQA/MLA).

One program handles BLOCK_M query tokens x all query heads of one KV head, so each key/value
page is read once per group of heads; keys are streamed BLOCK_N at a time with an online
softmax. Decode steps (one query token per sequence) have a kernel of their own whose key tiles
never cross a page and which splits the contexts of small batches (_paged_decode_kernel). An fp8
pool is converted as it is read: to float16 under bf16 queries (every e4m3 value is exact in
float16, the conversion is one instruction on Hopper where bf16 takes several, and the
probabilities keep more bits), otherwise to the queries' dtype.

Gemma 2: on a sliding layer (SLIDING, `window`) a query at position p sees only keys
p - window + 1 .. p, and the key loop starts at the first tile one of the program's queries
sees; soft-capped attention (SOFTCAPPED, `softcap`) squashes each score s into
softcap * tanh(s / softcap) before the softmax. Both are compile-time switches, so other models
run the kernels they ran before.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .paged_attention import query_block_size


@triton.jit
def _scores(q, k, scale, softcap, SOFTCAPPED: tl.constexpr):
    """q k^T * scale, soft-capped when SOFTCAPPED, in log2 units (the kernels use exp2).
    tanh(x) = 2 sigmoid(2x) - 1: an absolute error near float32's epsilon, and Triton's interpreter
    runs it (it has no libdevice)."""
    if SOFTCAPPED:
        tanh = 2.0 * tl.sigmoid(tl.dot(q, k) * (2.0 * scale / softcap)) - 1.0
        return tanh * (softcap * 1.4426950408889634)
    return tl.dot(q, k) * (scale * 1.4426950408889634)


@triton.jit
def _paged_attention_kernel(
    Q,
    K,
    V,
    O,
    page_table,
    seq_lens,
    query_start,
    block_seq,
    block_index,
    scale,
    window,
    softcap,
    stride_qt,
    stride_qh,
    stride_kp,
    stride_ks,
    stride_kh,
    stride_vp,
    stride_vs,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_pt,
    GROUP: tl.constexpr,
    GROUP_P: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    LISTED: tl.constexpr,
    F16_DOT: tl.constexpr,
    SLIDING: tl.constexpr,
    SOFTCAPPED: tl.constexpr,
):
    if LISTED:  # the programs' (sequence, query block) pairs come from a list; -1: nothing to do
        b = tl.load(block_seq + tl.program_id(0))
        mblk = tl.load(block_index + tl.program_id(0))
        kvh = tl.program_id(1)
        if b < 0:
            return
    else:
        b = tl.program_id(0)
        mblk = tl.program_id(1)
        kvh = tl.program_id(2)
    q_begin = tl.load(query_start + b)
    q_len = tl.load(query_start + b + 1) - q_begin
    if mblk * BLOCK_M >= q_len:
        return
    ctx = tl.load(seq_lens + b)
    rows = tl.arange(0, BLOCK_M * GROUP_P)
    tok = mblk * BLOCK_M + rows // GROUP_P
    g = rows % GROUP_P
    head = kvh * GROUP + g
    row_ok = (tok < q_len) & (g < GROUP)
    qpos = ctx - q_len + tok
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        Q + (q_begin + tok)[:, None] * stride_qt + head[:, None] * stride_qh + dk[None, :],
        mask=row_ok[:, None] & (dk[None, :] < DK),
        other=0.0,
    )
    if F16_DOT:  # clamped: a query beyond float16's range would make the scores inf, then NaN
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    m_i = tl.full([BLOCK_M * GROUP_P], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M * GROUP_P], tl.float32)
    acc = tl.zeros([BLOCK_M * GROUP_P, BLOCK_DV], tl.float32)
    # Keys past the last query of this block are never visible: stop there.
    kv_end = tl.minimum(ctx, ctx - q_len + (mblk + 1) * BLOCK_M)
    kv_start = 0
    if SLIDING:  # keys before the window of this block's first query are never visible: start there
        kv_start = tl.maximum(ctx - q_len + mblk * BLOCK_M - window + 1, 0) // BLOCK_N * BLOCK_N
    for start in range(kv_start, kv_end, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < kv_end
        page = tl.load(page_table + b * stride_pt + n // PAGE, mask=n_ok, other=0).to(tl.int64)
        slot = n % PAGE
        k = tl.load(
            K + page[None, :] * stride_kp + slot[None, :] * stride_ks + kvh * stride_kh + dk[:, None],
            mask=n_ok[None, :] & (dk[:, None] < DK),
            other=0.0,
        ).to(q.dtype)
        s = _scores(q, k, scale, softcap, SOFTCAPPED)
        visible = (n[None, :] <= qpos[:, None]) & n_ok[None, :]
        if SLIDING:
            visible = visible & (n[None, :] > qpos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            V + page[:, None] * stride_vp + slot[:, None] * stride_vs + kvh * stride_vh + dv[None, :],
            mask=n_ok[:, None] & (dv[None, :] < DV),
            other=0.0,
        ).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(
        O + (q_begin + tok)[:, None] * stride_ot + head[:, None] * stride_oh + dv[None, :],
        out.to(O.dtype.element_ty),
        mask=row_ok[:, None] & (dv[None, :] < DV),
    )


@triton.jit
def _paged_decode_kernel(
    Q,
    K,
    V,
    O,
    part,
    part_max,
    part_sum,
    page_table,
    seq_lens,
    query_start,
    scale,
    window,
    softcap,
    stride_qt,
    stride_qh,
    stride_kp,
    stride_ks,
    stride_kh,
    stride_vp,
    stride_vs,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_pt,
    n_heads,
    GROUP: tl.constexpr,
    ROWS: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    SPLITS: tl.constexpr,
    F16_DOT: tl.constexpr,
    SLIDING: tl.constexpr,
    SOFTCAPPED: tl.constexpr,
):
    """One query token per sequence; program (sequence, KV head, split of the context). A key
    tile lies inside one page (PAGE % BLOCK_N == 0), so its page number is one scalar load and
    its addresses are that page's base plus offsets fixed outside the loop: the general kernel's
    per-key page lookups and address arithmetic were most of a decode step's instructions.
    With SPLITS > 1 each program attends to its share of the context and leaves its output,
    running max and sum in part* for _combine_splits_kernel (few sequences, long contexts).
    SLIDING: the query (at ctx - 1) sees keys from ctx - window; tiles before the one holding that
    key are skipped, so a split wholly before the window is empty."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(seq_lens + b)
    span = tl.cdiv(tl.cdiv(ctx, SPLITS), BLOCK_N) * BLOCK_N
    lo = split * span
    hi = tl.minimum(ctx, lo + span)
    row = tl.load(query_start + b)
    g = tl.arange(0, ROWS)  # the group's query heads, padded to tl.dot's 16 rows
    head = kvh * GROUP + g
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        Q + row * stride_qt + head[:, None] * stride_qh + dk[None, :],
        mask=(g[:, None] < GROUP) & (dk[None, :] < DK),
        other=0.0,
    )
    if F16_DOT:  # clamped: a query beyond float16's range would make the scores inf, then NaN
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_DV], tl.float32)
    j = tl.arange(0, BLOCK_N)
    k_offsets = j[None, :] * stride_ks + kvh * stride_kh + dk[:, None]
    v_offsets = j[:, None] * stride_vs + kvh * stride_vh + dv[None, :]
    if SLIDING:  # tiles stay BLOCK_N-aligned, so each still lies inside one page
        lo = tl.maximum(lo, tl.maximum(ctx - window, 0) // BLOCK_N * BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        page = tl.load(page_table + b * stride_pt + start // PAGE).to(tl.int64)
        first = start % PAGE
        n_ok = start + j < hi
        if SLIDING:
            n_ok = n_ok & (start + j >= ctx - window)
        k = tl.load(
            K + page * stride_kp + first * stride_ks + k_offsets, mask=n_ok[None, :] & (dk[:, None] < DK), other=0.0
        ).to(q.dtype)
        s = tl.where(n_ok[None, :], _scores(q, k, scale, softcap, SOFTCAPPED), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile has a visible key
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            V + page * stride_vp + first * stride_vs + v_offsets, mask=n_ok[:, None] & (dv[None, :] < DV), other=0.0
        ).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # no keys (a padding row, an empty split): zeros
    row_ok = g < GROUP
    if SPLITS == 1:
        tl.store(
            O + row * stride_ot + head[:, None] * stride_oh + dv[None, :],
            out.to(O.dtype.element_ty),
            mask=row_ok[:, None] & (dv[None, :] < DV),
        )
    else:
        at = (b * n_heads + head) * SPLITS + split
        tl.store(part + at[:, None] * BLOCK_DV + dv[None, :], out, mask=row_ok[:, None])
        tl.store(part_max + at, m_i, mask=row_ok)
        tl.store(part_sum + at, l_i, mask=row_ok)


@triton.jit
def _combine_splits_kernel(
    part,
    part_max,
    part_sum,
    O,
    query_start,
    stride_ot,
    stride_oh,
    n_heads,
    SPLITS: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Program (sequence, head): the splits' outputs weighted by their share of the softmax sum."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    at = (b * n_heads + h) * SPLITS + tl.arange(0, SPLITS)
    m = tl.load(part_max + at)
    top = tl.max(m, 0)
    weight = tl.exp2(m - tl.where(top == float("-inf"), 0.0, top)) * tl.load(part_sum + at)  # empty splits: 0
    dv = tl.arange(0, BLOCK_DV)
    out = tl.sum(tl.load(part + at[:, None] * BLOCK_DV + dv[None, :]) * weight[:, None], 0)
    total = tl.sum(weight, 0)
    out = out / tl.where(total == 0.0, 1.0, total)
    tl.store(O + tl.load(query_start + b) * stride_ot + h * stride_oh + dv, out.to(O.dtype.element_ty), mask=dv < DV)


# Decode tiles: 16 keys, 5 stages, one warp, at most 128 registers a thread (so more one-warp
# programs fit on an SM than at the compiler's own register count). Chosen by sweeps on the
# Qwen3-0.6B shape over fp8 and bf16 pages, against the general kernel's best tiles: deeper
# pipelines matter more than wider tiles here (measured: see bench/RESULTS.md, 2026-11-26
# decode kernel rows: the page-tile kernel and the constant sweep).
DECODE_BLOCK_N, DECODE_STAGES, DECODE_WARPS, DECODE_MAX_REGISTERS = 16, 5, 1, 128
# Fewer (sequence, KV head) programs than this split each context to fill the GPU (flash-decoding).
# Splitting pays when there are too few programs to fill the GPU and costs a little when there
# are enough (measured: see bench/RESULTS.md, 2026-11-26 split-KV notes of the decode kernel rows).
DECODE_PROGRAMS, DECODE_MAX_SPLITS = 1024, 32
MIN_DOT_SIZE = 16  # tl.dot's smallest inner (K) size for 16-bit inputs


def head_block(dim: int) -> int:
    """The tile width of a head dimension: a power of two, and at least tl.dot's smallest
    inner size (16), which heads of tiny models (8 wide) are below; the loads mask the rest."""
    return max(MIN_DOT_SIZE, triton.next_power_of_2(dim))


def decode_splits(batch: int, n_kv_heads: int) -> int:
    """Splits of each context a decode launch uses; a function of the batch alone, so CUDA graphs
    capture it."""
    splits = 1
    while batch * n_kv_heads * splits < DECODE_PROGRAMS and splits < DECODE_MAX_SPLITS:
        splits *= 2
    return splits


def _decode(q, k_cache, v, out, page_table, seq_lens, query_start, scale, dv, f16_dot, window, softcap):
    n_heads, dk = q.shape[1], q.shape[2]
    n_kv_heads, page_size = k_cache.shape[2], k_cache.shape[1]
    batch = seq_lens.shape[0]
    group = n_heads // n_kv_heads
    rows = max(16, triton.next_power_of_2(group))
    block_dk, block_dv = head_block(dk), head_block(dv)
    splits = decode_splits(batch, n_kv_heads)
    part = q.new_empty(batch * n_heads * splits, block_dv, dtype=torch.float32) if splits > 1 else out
    stats = q.new_empty(2, batch * n_heads * splits, dtype=torch.float32) if splits > 1 else (out, out)
    # The register cap fits a 16 x 128 accumulator; wider ones keep the compiler's choice.
    cap = {"maxnreg": DECODE_MAX_REGISTERS} if rows * max(block_dk, block_dv) <= 16 * 128 else {}
    _paged_decode_kernel[(batch, n_kv_heads, splits)](
        q,
        k_cache,
        v,
        out,
        part,
        stats[0],
        stats[1],
        page_table,
        seq_lens,
        query_start,
        scale,
        window or 0,
        softcap or 1.0,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        page_table.stride(0),
        n_heads,
        GROUP=group,
        ROWS=rows,
        PAGE=page_size,
        BLOCK_N=DECODE_BLOCK_N,
        DK=dk,
        DV=dv,
        BLOCK_DK=block_dk,
        BLOCK_DV=block_dv,
        SPLITS=splits,
        F16_DOT=f16_dot,
        SLIDING=window is not None,
        SOFTCAPPED=softcap is not None,
        num_warps=DECODE_WARPS,
        num_stages=DECODE_STAGES,
        **cap,
    )
    if splits > 1:
        _combine_splits_kernel[(batch, n_heads)](
            part,
            stats[0],
            stats[1],
            out,
            query_start,
            out.stride(0),
            out.stride(1),
            n_heads,
            SPLITS=splits,
            DV=dv,
            BLOCK_DV=block_dv,
            num_warps=1,
        )
    return out


def paged_attention_triton(
    q,
    k_cache,
    v_cache,
    page_table,
    seq_lens,
    query_start,
    scale,
    v_dim=None,
    max_q_len=None,
    blocks=None,
    window=None,
    softcap=None,
):
    """blocks: None, or (block_seq, block_index) int32 tensors listing the (sequence, query block)
    of every program, query blocks of query_block_size(...) tokens, unused entries -1: the
    launch then depends on the list's length only, not on the step's sequence lengths (CUDA
    graphs for prefill steps). window, softcap: Gemma 2's sliding window and soft-cap (the
    module docstring), None for off."""
    n_tokens, n_heads, dk = q.shape
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1, "last dims must be contiguous"
    n_kv_heads, page_size = k_cache.shape[2], k_cache.shape[1]
    v = k_cache if v_cache is None else v_cache
    dv = v_dim if v_cache is None else v_cache.shape[-1]
    out = q.new_empty(n_tokens, n_heads, dv)
    group = n_heads // n_kv_heads
    block_dk, block_dv = head_block(dk), head_block(dv)
    wide = block_dk > 128  # MLA latents: keep tiles small enough for shared memory
    f16_dot = k_cache.dtype == torch.float8_e4m3fn and q.dtype == torch.bfloat16
    if blocks is None and max_q_len is None:
        max_q_len = int((query_start[1:] - query_start[:-1]).max())
    if blocks is None and max_q_len == 1 and not wide and page_size % DECODE_BLOCK_N == 0:
        return _decode(q, k_cache, v, out, page_table, seq_lens, query_start, scale, dv, f16_dot, window, softcap)
    block_n, stages, warps = (32, 1, 8) if wide else (64, 2, 4)
    if blocks is not None:
        block_m = query_block_size(n_heads, n_kv_heads, dk)
        grid = (blocks[0].shape[0], n_kv_heads)
        block_seq, block_index = blocks
    else:
        block_m = query_block_size(n_heads, n_kv_heads, dk, decode=max_q_len == 1)
        grid = (seq_lens.shape[0], triton.cdiv(max_q_len, block_m), n_kv_heads)
        block_seq = block_index = seq_lens  # unused
    _paged_attention_kernel[grid](
        q,
        k_cache,
        v,
        out,
        page_table,
        seq_lens,
        query_start,
        block_seq,
        block_index,
        scale,
        window or 0,
        softcap or 1.0,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        page_table.stride(0),
        GROUP=group,
        GROUP_P=triton.next_power_of_2(group),
        PAGE=page_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        DK=dk,
        DV=dv,
        BLOCK_DK=block_dk,
        BLOCK_DV=block_dv,
        LISTED=blocks is not None,
        F16_DOT=f16_dot,
        SLIDING=window is not None,
        SOFTCAPPED=softcap is not None,
        num_warps=warps,
        num_stages=stages,
    )
    return out
