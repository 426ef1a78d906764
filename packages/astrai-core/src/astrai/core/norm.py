"""RMSNorm."""

import torch
from torch import nn

from .kernels.dispatch import use_fused


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_fused(x):
            from .kernels import fused_norm

            if fused_norm.supports(x, self.weight):
                return fused_norm.rms_norm(x, self.weight, self.eps)
        return self._torch_forward(x)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual, norm(x + residual)); one kernel at inference on CUDA."""
        if use_fused(x):
            from .kernels import fused_norm

            if fused_norm.supports(x, self.weight, residual):
                return fused_norm.rms_norm(x, self.weight, self.eps, residual)
        x = x + residual
        return x, self._torch_forward(x)

    def _torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32: bf16 variance loses too much precision.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
