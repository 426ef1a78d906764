"""RMSNorm (optionally after a residual add) in one Triton launch.

Why: the torch RMSNorm is ~8 kernels (cast, pow, mean, add, rsqrt, mul, cast, mul), it runs
several times per layer, and a decode step is bound by kernel launches, not by bytes. This
kernel keeps the torch path's rounding order: float32 statistics, normalised value rounded to
the input dtype, then multiplied by the weight and rounded to the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import FUSED_DTYPES

MAX_COLS = 16384  # one row lives in registers (<= 64 floats a thread at 8 warps); wider rows keep torch


@triton.jit
def _rms_norm_kernel(
    X, R, W, Y, S, stride_x, stride_r, stride_y, stride_s, n_cols, eps, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # torch's `x + r` in the input dtype: add in float32, round once; the sum is also returned.
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(S.dtype.element_ty)
        tl.store(S + row * stride_s + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    normed = (xf * rstd).to(x.dtype)
    w = tl.load(W + cols, mask=mask, other=0.0)
    tl.store(Y + row * stride_y + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(Y.dtype.element_ty), mask=mask)


def supports(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> bool:
    """Shapes and dtypes the kernel handles; anything else keeps the torch path."""
    n = x.shape[-1]
    ok = (
        x.dtype in FUSED_DTYPES
        and weight.dtype in FUSED_DTYPES
        and weight.shape == (n,)
        and weight.stride(0) == 1
        and n <= MAX_COLS
        and x.numel() > 0
    )
    if residual is not None:
        ok = ok and residual.shape == x.shape and residual.dtype == x.dtype
    return ok


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(rows, cols) with unit column stride: a view where the layout allows, else a copy."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """weight * norm(x), or with `residual`: (x + residual, weight * norm(x + residual))."""
    shape, n = x.shape, x.shape[-1]
    xr = _rows(x)
    out = torch.empty(shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    out2 = out.view(-1, n)
    if residual is None:
        rr, summed = xr, xr  # unused by the kernel (HAS_RESIDUAL is off)
    else:
        rr, summed = _rows(residual), torch.empty(shape, dtype=x.dtype, device=x.device).view(-1, n)
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(xr.shape[0],)](
        xr,
        rr,
        weight,
        out2,
        summed,
        xr.stride(0),
        rr.stride(0),
        out2.stride(0),
        summed.stride(0),
        n,
        eps,
        BLOCK=block,
        HAS_RESIDUAL=residual is not None,
        num_warps=min(max(block // 256, 1), 8),
    )
    return out if residual is None else (summed.view(shape), out)
