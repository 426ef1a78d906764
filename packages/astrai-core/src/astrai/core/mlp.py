"""SwiGLU feed-forward block."""

import torch.nn.functional as F
from torch import nn

from .kernels.dispatch import use_fused


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        gate, up = self.gate_proj(x), self.up_proj(x)
        if use_fused(gate):
            from .kernels import fused_silu_mul

            if fused_silu_mul.supports(gate, up):
                return self.down_proj(fused_silu_mul.silu_mul(gate, up))
        return self.down_proj(F.silu(gate) * up)
