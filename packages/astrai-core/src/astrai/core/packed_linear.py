"""Linears that read the same input, run as one GEMM at inference (q/k/v, gate/up).

Why: at batch 256 a Qwen3-0.6B decode step spends more on seven small GEMMs a layer than their
bytes cost; one GEMM over the concatenated weights is fewer, fuller kernels (measured: see
bench/RESULTS.md, 2026-11-25 row "q/k/v as 3 GEMMs vs 1 packed"). The linears keep their
Parameters, so names, state_dict and in-place weight loads (`copy_`) work as before: each
weight becomes a view into the packed tensor. Anything that gives a weight new storage
(`.to()`, a new Parameter, a deep copy) breaks the view; the packed path then steps aside and
the linears run one by one. Training never packs: gradients flow to the Parameters, not to
the packed tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PackedLinear:
    """Several nn.Linear of one input size, weights (and biases) stored back to back."""

    def __init__(self, linears: list[nn.Linear]):
        if not packable(linears):
            raise ValueError("PackedLinear takes nn.Linear layers of one input size, all with a bias or none")
        self.linears = linears
        self.sizes = [lin.out_features for lin in linears]
        self.weight = _pack([lin.weight for lin in linears])
        self.bias = None if linears[0].bias is None else _pack([lin.bias for lin in linears])
        self._pointers = self._current_pointers()

    def _current_pointers(self) -> list[int]:
        return [p.data_ptr() for lin in self.linears for p in (lin.weight, lin.bias) if p is not None]

    def intact(self) -> bool:
        """Every weight is still the view made at packing (nothing replaced its storage)."""
        return self._current_pointers() == self._pointers

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if torch.is_grad_enabled() or not self.intact():
            return [lin(x) for lin in self.linears]
        return list(F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1))


def packable(linears: list[nn.Module]) -> bool:
    """Plain nn.Linear layers (not LoRA or other wrappers) of one input size, all with a bias or none."""
    return (
        all(type(lin) is nn.Linear for lin in linears)
        and len({lin.in_features for lin in linears}) == 1
        and len({lin.bias is None for lin in linears}) == 1
    )


def _pack(params: list[nn.Parameter]) -> torch.Tensor:
    """One tensor holding the params end to end along dim 0; each param's data becomes its slice."""
    packed = torch.cat([p.detach() for p in params])
    for p, part in zip(params, packed.split([p.shape[0] for p in params])):
        p.data = part
    return packed


def pack_projections(model: nn.Module) -> int:
    """Pack every module that offers it (`pack_projections()`); returns how many were packed."""
    packed = 0
    for module in model.modules():
        pack = getattr(module, "pack_projections", None)
        if callable(pack):
            packed += bool(pack())
    return packed
