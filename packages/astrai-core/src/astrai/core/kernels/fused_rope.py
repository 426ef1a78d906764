"""Rotary embedding of q and k in one Triton launch, optionally after a per-head RMSNorm.

Why: in torch, rotating q and k is ~10 kernels per layer (mul, chunk/neg/cat, mul, add for
each) and Qwen3's q/k RMSNorm is another ~16, while a decode step is bound by kernel launches.
One program handles one token: all its q heads, then all its k heads. The rotate-half layout
(first half pairs with second half) is loaded as two halves, so no shuffle is needed. Rounding
follows the torch path: norm rounded to the input dtype, then x*cos and rotate_half(x)*sin each
rounded, then their sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import FUSED_DTYPES


@triton.jit
def _rotate_heads(
    X,
    O,
    W,
    x_row,
    o_row,
    stride_h,
    n_heads,
    cos1,
    cos2,
    sin1,
    sin2,
    eps,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    HAS_NORM: tl.constexpr,
):
    h = tl.arange(0, BLOCK_H)[:, None]
    c = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < n_heads) & (c < HALF)
    first = X + x_row + h * stride_h + c
    x1 = tl.load(first, mask=mask, other=0.0)
    x2 = tl.load(first + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    if HAS_NORM:
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        rstd = tl.math.rsqrt((tl.sum(f1 * f1, axis=1) + tl.sum(f2 * f2, axis=1)) / (2 * HALF) + eps)[:, None]
        w1 = tl.load(W + c, mask=c < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(W + HALF + c, mask=c < HALF, other=0.0).to(tl.float32)
        x1 = (w1 * (f1 * rstd).to(dtype).to(tl.float32)).to(dtype)
        x2 = (w2 * (f2 * rstd).to(dtype).to(tl.float32)).to(dtype)
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    out1 = (f1 * cos1).to(dtype).to(tl.float32) + (-f2 * sin1).to(dtype).to(tl.float32)
    out2 = (f2 * cos2).to(dtype).to(tl.float32) + (f1 * sin2).to(dtype).to(tl.float32)
    dest = O + o_row + h * (2 * HALF) + c
    tl.store(dest, out1.to(dtype), mask=mask)
    tl.store(dest + HALF, out2.to(dtype), mask=mask)


@triton.jit
def _qk_rope_kernel(
    Q,
    K,
    QO,
    KO,
    COS,
    SIN,
    QW,
    KW,
    seq_len,
    n_q_heads,
    n_k_heads,
    eps,
    sq_b,
    sq_t,
    sq_h,
    sk_b,
    sk_t,
    sk_h,
    sc_b,
    sc_t,
    HALF: tl.constexpr,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    HAS_NORM: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    b, t = tok // seq_len, tok % seq_len
    c = tl.arange(0, BLOCK_HALF)
    cm = c < HALF
    trig = b * sc_b + t * sc_t + c
    cos1 = tl.load(COS + trig, mask=cm, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(COS + trig + HALF, mask=cm, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(SIN + trig, mask=cm, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(SIN + trig + HALF, mask=cm, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(
        Q,
        QO,
        QW,
        b * sq_b + t * sq_t,
        tok * n_q_heads * 2 * HALF,
        sq_h,
        n_q_heads,
        cos1,
        cos2,
        sin1,
        sin2,
        eps,
        HALF,
        BLOCK_QH,
        BLOCK_HALF,
        HAS_NORM,
    )
    _rotate_heads(
        K,
        KO,
        KW,
        b * sk_b + t * sk_t,
        tok * n_k_heads * 2 * HALF,
        sk_h,
        n_k_heads,
        cos1,
        cos2,
        sin1,
        sin2,
        eps,
        HALF,
        BLOCK_KH,
        BLOCK_HALF,
        HAS_NORM,
    )


def supports(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, norm_weights=None) -> bool:
    """q/k (batch, seq, heads, rope_dim) with unit last stride, one dtype throughout;
    cos (batch or 1, seq, rope_dim)."""
    if q.dim() != 4 or k.dim() != 4:
        return False
    b, t, _, d = q.shape
    ok = (
        k.shape[:2] == (b, t)
        and k.shape[3] == d
        and d % 2 == 0
        and cos.dim() == 3
        and cos.shape[0] in (1, b)
        and cos.shape[1:] == (t, d)
        and q.dtype in FUSED_DTYPES
        and q.dtype == k.dtype == cos.dtype
        and q.stride(-1) == 1
        and k.stride(-1) == 1
        and cos.stride(-1) == 1
        and q.numel() > 0
        and k.numel() > 0
    )
    if ok and norm_weights is not None:
        ok = all(w.shape == (d,) and w.dtype == q.dtype and w.stride(0) == 1 for w in norm_weights)
    return ok


def qk_rope(q, k, cos, sin, norm_weights=None, eps: float = 0.0):
    """(rope(norm_q(q)), rope(norm_k(k))) as new contiguous tensors; norm_weights=(w_q, w_k) or None."""
    b, t, hq, d = q.shape
    hk = k.shape[2]
    cos, sin = cos.expand(b, t, d), sin.expand(b, t, d)
    if sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    wq, wk = norm_weights if norm_weights is not None else (q, k)  # unused when HAS_NORM is off
    half = d // 2
    _qk_rope_kernel[(b * t,)](
        q,
        k,
        q_out,
        k_out,
        cos,
        sin,
        wq,
        wk,
        t,
        hq,
        hk,
        eps,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        cos.stride(0),
        cos.stride(1),
        HALF=half,
        BLOCK_QH=triton.next_power_of_2(hq),
        BLOCK_KH=triton.next_power_of_2(hk),
        BLOCK_HALF=triton.next_power_of_2(half),
        HAS_NORM=norm_weights is not None,
        num_warps=4,
    )
    return q_out, k_out
