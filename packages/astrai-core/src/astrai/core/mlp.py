"""SwiGLU feed-forward block."""

import torch.nn.functional as F
from torch import nn

from .kernels.dispatch import use_fused
from .packed_linear import PackedLinear, packable


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.packed: PackedLinear | None = None  # gate/up as one GEMM at inference (pack_projections)

    def pack_projections(self) -> bool:
        if not packable([self.gate_proj, self.up_proj]):
            return False
        self.packed = PackedLinear([self.gate_proj, self.up_proj])
        return True

    def forward(self, x):
        gate, up = self.packed(x) if self.packed is not None else (self.gate_proj(x), self.up_proj(x))
        if use_fused(gate):
            from .kernels import fused_silu_mul

            if fused_silu_mul.supports(gate, up):
                return self.down_proj(fused_silu_mul.silu_mul(gate, up))
        return self.down_proj(F.silu(gate) * up)
