"""Optimizers: AdamW (fused on CUDA), and Muon for hidden 2-D weights with AdamW for the rest.

Muon (momentum orthogonalised by a Newton-Schulz iteration) updates each weight matrix with
an approximately orthogonal matrix, so every direction of the matrix moves by the same amount
instead of the few dominant ones. It suits the hidden linear layers; the embedding, the output
head and the 1-D parameters (norms, biases) keep AdamW. Both live in one torch Optimizer, so
Lightning's checkpointing, gradient clipping and LR schedulers treat it like any other.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn

from .master_adamw import MasterWeightAdamW, closure_loss

OPTIMIZERS = ("adamw", "muon")

# Quintic Newton-Schulz coefficients chosen to push all singular values into ~[0.7, 1.2] in
# five steps; an exactly converging iteration would need many more steps for the same use.
_NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximate U V^T for g = U S V^T (the nearest semi-orthogonal matrix)."""
    a, b, c = _NS_COEFFS
    # bf16 matmuls are fast and precise enough on GPU; CPU bf16 matmul is slow, use float32.
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = x.shape[0] > x.shape[1]
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    x = x / (x.norm() + eps)  # Frobenius norm bounds the spectral norm: singular values <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon on groups with ``use_muon=True``, AdamW on the others.

    Muon updates are scaled by 0.2 * sqrt(max(rows, cols)), which gives them the RMS of a
    typical AdamW update; one learning rate (and its schedule) then serves both kinds of group.
    Weight decay is decoupled (AdamW-style) in both.
    """

    def __init__(
        self,
        param_groups,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        betas=(0.9, 0.95),
        eps: float = 1e-8,
    ):
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            betas=tuple(betas),
            eps=eps,
            use_muon=False,
        )
        super().__init__(param_groups, defaults)
        for group in self.param_groups:
            bad = [tuple(p.shape) for p in group["params"] if group["use_muon"] and p.ndim != 2]
            if bad:
                raise ValueError(f"Muon groups take 2-D weights only, got shapes {bad}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            (self._muon_step if group["use_muon"] else self._adamw_step)(group)
        return loss

    def _muon_step(self, group) -> None:
        lr, momentum = group["lr"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
            buf.mul_(momentum).add_(p.grad)
            update = p.grad.add(buf, alpha=momentum) if group["nesterov"] else buf
            ortho = newton_schulz(update, group["ns_steps"])
            p.mul_(1 - lr * group["weight_decay"])
            p.add_(ortho, alpha=-lr * 0.2 * math.sqrt(max(p.shape)))

    def _adamw_step(self, group) -> None:
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            step = state["step"]
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(eps)
            p.mul_(1 - lr * group["weight_decay"])
            p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**step))


def _original_shape(name: str, p: torch.Tensor, shapes: Mapping[str, tuple[int, ...]] | None) -> tuple[int, ...]:
    clean = name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
    return tuple(shapes[clean]) if shapes is not None and clean in shapes else tuple(p.shape)


def _is_embedding_or_head(name: str) -> bool:
    return name.endswith(("embed_tokens.weight", "lm_head.weight"))


def build_optimizer(
    model: nn.Module,
    name: Literal["adamw", "muon"] = "adamw",
    lr: float = 3e-4,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    momentum: float = 0.95,
    ns_steps: int = 5,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> torch.optim.Optimizer:
    """Optimizer over the trainable parameters of ``model``.

    Weight decay applies to matrices only: decaying norm gains and biases towards zero only
    hurts. Tied weights appear once (named_parameters de-duplicates them). Low-precision
    (bf16/fp16) trainable weights get MasterWeightAdamW, which keeps float32 masters and moments.

    ``shapes`` maps parameter names to their shapes before FSDP wrapped the model: FSDP's
    parameters are flat 1-D shards, which would otherwise all be taken for norm gains (no
    weight decay, and parameter groups a one-device run cannot load).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters (all frozen?)")
    ndim = {id(p): len(_original_shape(n, p, shapes)) for n, p in trainable}
    low = [n for n, p in trainable if p.dtype in (torch.bfloat16, torch.float16)]
    if low and name == "muon":
        raise ValueError(
            f"model.optimizer.name: muon keeps no float32 master weights, but {len(low)} trainable weights (e.g. "
            f"{low[0]}) are {dict(trainable)[low[0]].dtype}; use optimizer.name: adamw, or float32 weights "
            "(param_dtype: float32, precision: bf16-mixed)"
        )
    hidden = [p for n, p in trainable if name == "muon" and ndim[id(p)] == 2 and not _is_embedding_or_head(n)]
    if any(p.ndim != 2 for p in hidden):
        raise ValueError(
            "model.optimizer.name: muon orthogonalises whole weight matrices, but the strategy shards them "
            "(FSDP); use --model.optimizer.name=adamw with FSDP, or a DDP strategy with muon"
        )
    hidden_ids = {id(p) for p in hidden}
    rest = [p for _, p in trainable if id(p) not in hidden_ids]
    decay = [p for p in rest if ndim[id(p)] >= 2]
    no_decay = [p for p in rest if ndim[id(p)] < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "adamw":
        if low:  # AdamW's own state would be bf16 too: updates below a bf16 step would be lost
            return MasterWeightAdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps)
        fused = all(p.is_cuda for _, p in trainable)
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps, fused=fused)
    groups.append({"params": hidden, "weight_decay": weight_decay, "use_muon": True})
    return Muon([g for g in groups if g["params"]], lr=lr, momentum=momentum, ns_steps=ns_steps, betas=betas, eps=eps)
