"""When the model's forward swaps plain torch ops for the fused Triton kernels.

Only for inference on CUDA: a decode step is launch-bound (hundreds of tiny kernels per step),
so fusing RMSNorm / RoPE / SiLU*mul into one launch each is what pays. Training keeps the torch
ops: they carry autograd, and torch.compile fuses them itself. ASTRAI_FUSED_KERNELS=0 turns the
kernels off (for A/B benchmarks); set_fused_kernels() does the same from code.
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager

import torch

_ENV = "ASTRAI_FUSED_KERNELS"
# The kernels compute in float32: float64 keeps the torch ops (and their precision).
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _from_env() -> bool:
    value = os.environ.get(_ENV, "1").strip()
    if value not in ("0", "1", ""):
        raise ValueError(f"{_ENV} must be 0 (torch ops) or 1 (fused Triton kernels), got {value!r}")
    return value != "0"


_enabled = _from_env()


def fused_kernels_enabled() -> bool:
    return _enabled


def set_fused_kernels(enabled: bool) -> None:
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"set_fused_kernels expects True or False, got {enabled!r}")
    _enabled = enabled


@contextmanager
def fused_kernels(enabled: bool):
    """Temporarily force the fused kernels on or off (tests, A/B comparisons)."""
    before = _enabled
    set_fused_kernels(enabled)
    try:
        yield
    finally:
        set_fused_kernels(before)


def use_fused(x: torch.Tensor) -> bool:
    """True for a CUDA tensor under no_grad / inference_mode, outside torch.compile tracing."""
    return _enabled and _HAS_TRITON and x.is_cuda and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
