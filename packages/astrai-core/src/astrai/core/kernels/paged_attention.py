"""Attention that reads the paged KV cache in place.

Layout (one layer): k_cache (num_pages, page_size, n_kv_heads, k_dim) and v_cache
(num_pages, page_size, n_kv_heads, v_dim). For multi-head latent attention v_cache is None
and the values are the first v_dim channels of the keys (the cached latent).

A step's queries are flattened over sequences ("varlen"): q (n_tokens, n_heads, k_dim),
sequence b owns rows query_start[b]:query_start[b+1]; these are its newest tokens, so
with context length seq_lens[b] the i-th of its q_len queries sits at position
seq_lens[b] - q_len + i and sees keys 0..that position. Decode (q_len = 1), prefill and
chunked prefill are the same call.

window (sliding layers, Gemma 2): the query at position p sees only keys p - window + 1 .. p.
softcap (Gemma 2): scores s become softcap * tanh(s / softcap) before the softmax.
"""

from __future__ import annotations

from ..attention_ops import attention, causal_mask


def paged_attention_reference(
    q, k_cache, v_cache, page_table, seq_lens, query_start, scale, v_dim=None, window=None, softcap=None
):
    """Gather each sequence's pages and run SDPA: the CPU path, and the oracle for the kernel."""
    n_heads = q.shape[1]
    v_dim = v_dim if v_cache is None else v_cache.shape[-1]
    out = q.new_zeros(q.shape[0], n_heads, v_dim)  # a row with no context (padding) stays zero, as in the kernel
    page_size = k_cache.shape[1]
    starts = query_start.tolist()
    for b, ctx in enumerate(seq_lens.tolist()):
        lo, hi = starts[b], starts[b + 1]
        if hi == lo or ctx == 0:
            continue
        pages = page_table[b, : -(-ctx // page_size)]
        k = k_cache[pages].flatten(0, 1)[:ctx].to(q.dtype)  # an fp8 pool is read in the query's dtype
        v = k[..., :v_dim] if v_cache is None else v_cache[pages].flatten(0, 1)[:ctx].to(q.dtype)
        q_len = hi - lo
        mask = causal_mask(q_len, ctx, window, q.device)
        o = attention(q[lo:hi].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), mask, scale, softcap)
        out[lo:hi] = o.transpose(0, 1)
    return out


def query_block_size(n_heads: int, n_kv_heads: int, dk: int, decode: bool = False) -> int:
    """Query tokens one program of the Triton kernel takes: tl.dot needs >= 16 rows, which decode
    fills with the heads of a KV group and prefill with tokens (64 rows; 16 for MLA's wide latents)."""
    wide = _next_power_of_2(dk) > 128
    rows = 16 if decode or wide else 64
    return max(rows // _next_power_of_2(n_heads // n_kv_heads), 1)


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def paged_attention(
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
    """Triton kernel on CUDA, the reference elsewhere. max_q_len avoids a host sync when known;
    blocks: the kernel's program list (paged_attention_triton), ignored by the reference."""
    if q.is_cuda:
        from .paged_attention_triton import paged_attention_triton

        return paged_attention_triton(
            q, k_cache, v_cache, page_table, seq_lens, query_start, scale, v_dim, max_q_len, blocks, window, softcap
        )
    return paged_attention_reference(
        q, k_cache, v_cache, page_table, seq_lens, query_start, scale, v_dim, window, softcap
    )
