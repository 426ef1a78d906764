"""Write a step's new keys and values into their page-pool slots in one Triton launch.

Why: `index_copy_` is one launch per tensor and moves rows at a fraction of copy bandwidth;
this kernel writes both with one program per token (measured in the engine: see
bench/RESULTS.md, 2026-11-25 `diag/ab.py` row, "Triton KV store off"). The values may be a
strided view (a split of the packed q/k/v GEMM output): rows and heads take any stride,
channels must be contiguous. An fp8 pool (kv_cache_dtype="fp8") gets the values clamped to
e4m3's range, then rounded.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import FUSED_DTYPES

FP8 = torch.float8_e4m3fn
POOL_DTYPES = (*FUSED_DTYPES, FP8)


@triton.jit
def _store_row(
    SRC, POOL, src_row, slot, stride_h, n_heads, dim, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, TO_FP8: tl.constexpr
):
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < n_heads) & (d < dim)
    x = tl.load(SRC + src_row + h * stride_h + d, mask=mask)
    if TO_FP8:  # clamp to e4m3's range (+-448): no overflow to NaN
        x = tl.minimum(tl.maximum(x.to(tl.float32), -448.0), 448.0)
    tl.store(POOL + slot * n_heads * dim + h * dim + d, x.to(POOL.dtype.element_ty), mask=mask)


@triton.jit
def _store_kv_kernel(
    K,
    V,
    K_POOL,
    V_POOL,
    SLOTS,
    n_heads,
    k_dim,
    v_dim,
    sk_t,
    sk_h,
    sv_t,
    sv_h,
    HAS_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
    TO_FP8: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + tok)
    _store_row(K, K_POOL, tok * sk_t, slot, sk_h, n_heads, k_dim, BLOCK_H, BLOCK_K, TO_FP8)
    if HAS_V:
        _store_row(V, V_POOL, tok * sv_t, slot, sv_h, n_heads, v_dim, BLOCK_H, BLOCK_V, TO_FP8)


def supports(k: torch.Tensor, v: torch.Tensor | None, k_pool: torch.Tensor, v_pool: torch.Tensor | None) -> bool:
    """k/v (tokens, heads, dim) with contiguous channels; pools (pages, page_size, heads, dim) contiguous."""
    pairs = [(k, k_pool)] + ([(v, v_pool)] if v is not None else [])
    return (
        k.shape[0] > 0
        and (v is None) == (v_pool is None)
        and all(
            x.dim() == 3
            and x.dtype in FUSED_DTYPES
            and pool.dtype in POOL_DTYPES
            and x.stride(-1) == 1
            and pool.is_contiguous()
            and x.shape[1:] == pool.shape[2:]
            and x.shape[0] == k.shape[0]
            for x, pool in pairs
        )
    )


def store_kv(
    k: torch.Tensor, v: torch.Tensor | None, k_pool: torch.Tensor, v_pool: torch.Tensor | None, slots: torch.Tensor
) -> None:
    """k_pool.flatten(0, 1)[slots] = k (and likewise v), for int64 slots of shape (tokens,)."""
    n, heads, k_dim = k.shape
    v_dim = v.shape[2] if v is not None else 1
    _store_kv_kernel[(n,)](
        k,
        v if v is not None else k,
        k_pool,
        v_pool if v_pool is not None else k_pool,
        slots,
        heads,
        k_dim,
        v_dim,
        k.stride(0),
        k.stride(1),
        *(v.stride()[:2] if v is not None else (0, 0)),
        HAS_V=v is not None,
        BLOCK_H=triton.next_power_of_2(heads),
        BLOCK_K=triton.next_power_of_2(k_dim),
        BLOCK_V=triton.next_power_of_2(v_dim),
        TO_FP8=k_pool.dtype == FP8,
        num_warps=4,
    )
