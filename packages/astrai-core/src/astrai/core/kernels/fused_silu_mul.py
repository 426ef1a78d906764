"""silu(gate) * up for the SwiGLU MLP in one Triton launch.

Why: torch runs silu and the multiply as two kernels and writes silu(gate) to memory in between;
in a launch-bound decode step the launch matters more than the bytes. gate and up may be the
two halves of one packed GEMM output (rows with a stride, unit last stride). Rounding follows
torch: silu in float32 rounded to the input dtype, then the product rounded.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import FUSED_DTYPES

_BLOCK = 1024


@triton.jit
def _silu_mul_kernel(G, U, O, width, stride_g, stride_u, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    tl.store(O + row * width + cols, (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=mask)


def supports(gate: torch.Tensor, up: torch.Tensor) -> bool:
    return (
        gate.shape == up.shape
        and gate.dtype == up.dtype
        and gate.dtype in FUSED_DTYPES
        and gate.numel() > 0
        and _rows(gate) is not None
        and _rows(up) is not None
    )


def _rows(x: torch.Tensor) -> torch.Tensor | None:
    """x as (rows, width) without a copy (unit last stride, rows evenly spaced), else None."""
    if x.stride(-1) != 1:
        return None
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return None


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    g, u = _rows(gate), _rows(up)
    rows, width = g.shape
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    grid = (rows, triton.cdiv(width, _BLOCK))
    _silu_mul_kernel[grid](g, u, out, width, g.stride(0), u.stride(0), BLOCK=_BLOCK, num_warps=4)
    return out
