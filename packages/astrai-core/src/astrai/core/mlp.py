"""Gated feed-forward block: SwiGLU (Llama, Qwen, Mistral, Phi-3) or GeGLU with tanh GeLU (Gemma).

Both are down(act(gate(x)) * up(x)); only the activation differs, so one module serves both and
checkpoints keep the same tensor names. The fused CUDA kernel covers SiLU, the common case.
"""

import torch.nn.functional as F
from torch import nn

from .kernels.dispatch import use_fused
from .packed_linear import PackedLinear, packable


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.act = act
        self.packed: PackedLinear | None = None  # gate/up as one GEMM at inference (pack_projections)

    def pack_projections(self) -> bool:
        if not packable([self.gate_proj, self.up_proj]):
            return False
        self.packed = PackedLinear([self.gate_proj, self.up_proj])
        return True

    def forward(self, x):
        gate, up = self.packed(x) if self.packed is not None else (self.gate_proj(x), self.up_proj(x))
        if self.act == "gelu_tanh":
            return self.down_proj(F.gelu(gate, approximate="tanh") * up)
        if use_fused(gate):
            from .kernels import fused_silu_mul

            if fused_silu_mul.supports(gate, up):
                return self.down_proj(fused_silu_mul.silu_mul(gate, up))
        return self.down_proj(F.silu(gate) * up)
