"""Mixture of experts: top-k routed SwiGLU experts plus always-on shared experts.

The router's softmax over all experts picks the top k; their weights are either rescaled to
sum to 1 (`moe_norm_topk`, Mixtral's softmax over the chosen logits) or kept as they are
(Qwen2-MoE's default), so imported checkpoints route as they were trained. The shared experts
may carry a per-token sigmoid gate (`moe_shared_gate`, Qwen2-MoE's shared_expert_gate).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .mlp import MLP


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = config.n_routed_experts, config.n_activated_experts
        self.norm_topk = config.moe_norm_topk
        self.gate = nn.Linear(config.dim, self.n_experts, bias=False)  # the router
        self.experts = nn.ModuleList(MLP(config.dim, config.moe_ffn_dim) for _ in range(self.n_experts))
        shared = config.shared_ffn_dim
        self.shared_experts = MLP(config.dim, shared) if shared else None
        self.shared_expert_gate = nn.Linear(config.dim, 1, bias=False) if config.moe_shared_gate else None
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """valid: (tokens,) bool, False for padding; padding is routed like any token (its output
        is ignored downstream) but left out of the balance loss, which it would otherwise skew."""
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        # Route in at least float32 (bf16 ties flip expert choices) but never below the input's precision.
        probs = self.gate(tokens).to(torch.promote_types(tokens.dtype, torch.float32)).softmax(dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(tokens)
        for e in range(self.n_experts):
            token_idx, slot = torch.where(chosen == e)
            if token_idx.numel():
                y = self.experts[e](tokens[token_idx]) * weights[token_idx, slot, None]
                out.index_add_(0, token_idx, y)
        if self.shared_experts is not None:
            out = out + self._shared(tokens)
        if self.training:
            self.aux_loss = (
                self._balance_loss(probs, chosen) if valid is None else self._balance_loss(probs[valid], chosen[valid])
            )
        return out.view(shape)

    def _shared(self, tokens: torch.Tensor) -> torch.Tensor:
        shared = self.shared_experts(tokens)
        if self.shared_expert_gate is None:
            return shared
        return torch.sigmoid(self.shared_expert_gate(tokens)) * shared

    def _balance_loss(self, probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Switch-style load balancing: n_experts * sum_e (share of routed slots) * (mean router prob).

        It equals 1 when routing is uniform and grows as experts are over- or under-used.
        """
        counts = torch.zeros(self.n_experts, device=probs.device, dtype=probs.dtype).index_add_(
            0, chosen.reshape(-1), torch.ones(chosen.numel(), device=probs.device, dtype=probs.dtype)
        )
        share = counts / chosen.numel()
        return self.n_experts * (share * probs.mean(0)).sum()
