"""Triton flash-attention over a paged KV cache (varlen queries, causal, GQA/MQA/MLA).

One program handles BLOCK_M query tokens x all query heads of one KV head, so each key/value
page is read once per group of heads; keys are streamed BLOCK_N at a time with an online
softmax. Decode steps (one query token per sequence) use small BLOCK_M. An fp8 pool is
converted as it is read: to float16 under bf16 queries (every e4m3 value is exact in float16, the
conversion is one instruction on Hopper where bf16 takes several, and the probabilities keep more
bits), otherwise to the queries' dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .paged_attention import has_short_decode_tiles, query_block_size


@triton.jit
def _paged_attention_kernel(
    Q, K, V, O, page_table, seq_lens, query_start, block_seq, block_index, scale,
    stride_qt, stride_qh, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
    stride_ot, stride_oh, stride_pt,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    LISTED: tl.constexpr, F16_DOT: tl.constexpr,
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
    q = tl.load(Q + (q_begin + tok)[:, None] * stride_qt + head[:, None] * stride_qh + dk[None, :],
                mask=row_ok[:, None] & (dk[None, :] < DK), other=0.0)
    if F16_DOT:  # clamped: a query beyond float16's range would make the scores inf, then NaN
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    m_i = tl.full([BLOCK_M * GROUP_P], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M * GROUP_P], tl.float32)
    acc = tl.zeros([BLOCK_M * GROUP_P, BLOCK_DV], tl.float32)
    # Keys past the last query of this block are never visible: stop there.
    kv_end = tl.minimum(ctx, ctx - q_len + (mblk + 1) * BLOCK_M)
    qk_scale = scale * 1.4426950408889634  # log2(e): use exp2
    for start in range(0, kv_end, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < kv_end
        page = tl.load(page_table + b * stride_pt + n // PAGE, mask=n_ok, other=0).to(tl.int64)
        slot = n % PAGE
        k = tl.load(K + page[None, :] * stride_kp + slot[None, :] * stride_ks + kvh * stride_kh + dk[:, None],
                    mask=n_ok[None, :] & (dk[:, None] < DK), other=0.0).to(q.dtype)
        s = tl.dot(q, k) * qk_scale
        visible = (n[None, :] <= qpos[:, None]) & n_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + page[:, None] * stride_vp + slot[:, None] * stride_vs + kvh * stride_vh + dv[None, :],
                    mask=n_ok[:, None] & (dv[None, :] < DV), other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(O + (q_begin + tok)[:, None] * stride_ot + head[:, None] * stride_oh + dv[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < DV))


def _decode_tiles(programs: int, fp8: bool, short_context: bool) -> tuple[int, int, int]:
    """(BLOCK_N, stages, warps) of a decode launch with `programs` (sequence, KV head) programs.

    An fp8 program moves few bytes per key tile, so on short contexts the online softmax's
    per-tile synchronisation of its warps dominates and many one-warp programs on short tiles
    win; on long contexts and few programs the four-warp 128-key tiles do. Qwen3-0.6B engine on
    an H100 (decode graph replay, fp8 pages): batch 256 at contexts 256-512 3.95 ms with
    (32, 3, 1) against 4.71 with (128, 3, 4); the mixed workload (contexts up to 2k) 21.5k out
    tok/s with (128, 3, 4) against 20.3k with (32, 3, 1) for every large batch. bf16 pages stay
    on (64, 2, 4) everywhere: 5.42 ms at batch 256, against 5.96 with (32, 3, 1), 5.6-5.7 others."""
    if short_context and programs >= 1024:
        return 32, 3, 1
    return (128, 3, 4) if fp8 else (64, 2, 4)


def paged_attention_triton(q, k_cache, v_cache, page_table, seq_lens, query_start, scale, v_dim=None, max_q_len=None,
                           blocks=None, short_context=False):
    """blocks: None, or (block_seq, block_index) int32 tensors listing the (sequence, query block)
    of every program, query blocks of query_block_size(...) tokens, unused entries -1: the
    launch then depends on the list's length only, not on the step's sequence lengths (CUDA
    graphs for prefill steps)."""
    n_tokens, n_heads, dk = q.shape
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1, "last dims must be contiguous"
    n_kv_heads, page_size = k_cache.shape[2], k_cache.shape[1]
    v = k_cache if v_cache is None else v_cache
    dv = v_dim if v_cache is None else v_cache.shape[-1]
    out = q.new_empty(n_tokens, n_heads, dv)
    group = n_heads // n_kv_heads
    group_p = triton.next_power_of_2(group)
    batch = seq_lens.shape[0]
    block_dk, block_dv = triton.next_power_of_2(dk), triton.next_power_of_2(dv)
    wide = block_dk > 128  # MLA latents: keep tiles small enough for shared memory
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    block_n, stages, warps = (32, 1, 8) if wide else (64, 2, 4)
    if blocks is not None:
        block_m = query_block_size(n_heads, n_kv_heads, dk)
        grid = (blocks[0].shape[0], n_kv_heads)
        block_seq, block_index = blocks
    else:
        if max_q_len is None:
            max_q_len = int((query_start[1:] - query_start[:-1]).max())
        block_m = query_block_size(n_heads, n_kv_heads, dk, decode=max_q_len == 1)
        if max_q_len == 1 and not wide:
            short = short_context and has_short_decode_tiles(k_cache.dtype, dk)  # as for the decode graphs
            block_n, stages, warps = _decode_tiles(batch * n_kv_heads, fp8, short)
        grid = (batch, triton.cdiv(max_q_len, block_m), n_kv_heads)
        block_seq = block_index = seq_lens  # unused
    _paged_attention_kernel[grid](
        q, k_cache, v, out, page_table, seq_lens, query_start, block_seq, block_index, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), page_table.stride(0),
        GROUP=group, GROUP_P=group_p, PAGE=page_size, BLOCK_M=block_m, BLOCK_N=block_n,
        DK=dk, DV=dv, BLOCK_DK=block_dk, BLOCK_DV=block_dv, LISTED=blocks is not None,
        F16_DOT=fp8 and q.dtype == torch.bfloat16, num_warps=warps, num_stages=stages,
    )
    return out
