"""silu(gate) * up for the SwiGLU MLP in one Triton launch.

Why: torch runs silu and the multiply as two kernels and writes silu(gate) to memory in between;
in a launch-bound decode step the launch matters more than the bytes. Rounding follows torch:
silu in float32 rounded to the input dtype, then the product rounded.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import FUSED_DTYPES

_BLOCK = 1024


@triton.jit
def _silu_mul_kernel(G, U, O, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0)
    u = tl.load(U + offs, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    tl.store(O + offs, (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=mask)


def supports(gate: torch.Tensor, up: torch.Tensor) -> bool:
    return (gate.shape == up.shape and gate.dtype == up.dtype and gate.dtype in FUSED_DTYPES
            and gate.is_contiguous() and up.is_contiguous() and gate.numel() > 0)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(gate)
    n = gate.numel()
    _silu_mul_kernel[(triton.cdiv(n, _BLOCK),)](gate, up, out, n, BLOCK=_BLOCK, num_warps=4)
    return out
