"""LoRA: low-rank adapters on chosen linear layers; the base weights stay frozen.

W x + (alpha / rank) * B A x, with A (rank, in) random and B (out, rank) zero, so training
starts from exactly the base model. The wrapped layer keeps the base layer's own `weight` and
`bias` parameters, so the state_dict keys of the base model are unchanged and a LoRA
checkpoint holds just two extra tensors per layer (`lora_A`, `lora_B`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

ALL_LINEAR = "all-linear"


@dataclass
class LoRAConfig:
    """rank: adapter rank; alpha: scale numerator (update scaled by alpha / rank);
    dropout: on the adapter input; targets: last names of the linear modules to adapt
    (e.g. q_proj, v_proj) or ["all-linear"] for every linear layer except lm_head."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"lora.rank must be a positive integer, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("lora.targets is empty: name the linear modules to adapt, e.g. [q_proj, v_proj]")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        # Skip nn.Linear.__init__: it would allocate and initialise a second weight.
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.adapter_enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.adapter_enabled:
            out = out + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling
        return out

    def merged_weight(self) -> torch.Tensor:
        return self.weight + self.scaling * (self.lora_B @ self.lora_A)


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Freeze every parameter of ``model``, wrap the target linears, return their names."""
    for p in model.parameters():
        p.requires_grad_(False)
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear and not n.endswith("lm_head")}
    if ALL_LINEAR in config.targets:
        chosen = list(linears)
    else:
        chosen = [n for n in linears if n.rsplit(".", 1)[-1] in config.targets]
    if not chosen:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ValueError(
            f"lora.targets {config.targets} matched no linear layer; this model has: {kinds} (or use [{ALL_LINEAR}])"
        )
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(linears[name], config.rank, config.alpha, config.dropout))
    return chosen


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@contextmanager
def adapters_disabled(model: nn.Module):
    """Run ``model`` as the base model (e.g. as the frozen DPO reference)."""
    layers = lora_layers(model)
    for m in layers:
        m.adapter_enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.adapter_enabled = True


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain nn.Linear layers back (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            plain.weight = nn.Parameter(module.merged_weight(), requires_grad=False)
            plain.bias = module.bias
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, plain)
    return model


@torch.no_grad()
def merge_lora_state_dict(state_dict: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """The same merge on a state dict (e.g. one gathered from FSDP shards), dropping the adapter keys."""
    merged = {k: v for k, v in state_dict.items() if not k.endswith((".lora_A", ".lora_B"))}
    for key, a in state_dict.items():
        if key.endswith(".lora_A"):
            prefix = key[: -len("lora_A")]
            b, w = state_dict[prefix + "lora_B"], state_dict[prefix + "weight"]
            merged[prefix + "weight"] = (w.float() + scaling * (b.float() @ a.float())).to(w.dtype)
    return merged
