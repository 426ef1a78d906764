"""Grouped-query attention, with optional q/k/v bias, qk-norm, an output gate, and Gemma 2's
sliding window and soft-capped logits."""

from __future__ import annotations

import torch
from torch import nn

from .attention_ops import attention, causal_mask
from .config import ModelConfig
from .kv_cache_view import KVCacheView, KVLayout
from .norm import RMSNorm
from .packed_linear import PackedLinear, packable
from .rope import apply_rope_qk


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.scale = (config.query_pre_attn_scalar or self.head_dim) ** -0.5
        self.window, self.softcap = config.layer_window(layer_idx), config.attn_logit_softcap
        # Passed to cache.attend only when set, so a cache without these options serves other models.
        self.cache_options = {k: v for k, v in (("window", self.window), ("softcap", self.softcap)) if v is not None}
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(config.dim, q_out, bias=config.attn_bias)
        self.k_proj = nn.Linear(config.dim, kv_out, bias=config.attn_bias)
        self.v_proj = nn.Linear(config.dim, kv_out, bias=config.attn_bias)
        self.o_proj = nn.Linear(q_out, config.dim, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        self.norm_after_rope = config.qk_norm_after_rope
        # Gated attention: a per-channel sigmoid gate on the attention output lets a head
        # switch itself off, which removes attention sinks and loss spikes.
        self.o_gate_proj = nn.Linear(config.dim, q_out, bias=False) if config.gated_attn else None
        self.packed: PackedLinear | None = None  # q/k/v as one GEMM at inference (pack_projections)

    def pack_projections(self) -> bool:
        linears = [self.q_proj, self.k_proj, self.v_proj]
        linears += [self.o_gate_proj] if self.o_gate_proj is not None else []
        if not packable(linears):  # say, a LoRA wrapper, or a biased q/k/v beside the bias-free gate
            return False
        self.packed = PackedLinear(linears)
        return True

    def _project(self, x) -> list[torch.Tensor]:
        """q, k, v (and the output gate's pre-activation, when gated) of x."""
        if self.packed is not None:
            return self.packed(x)
        out = [self.q_proj(x), self.k_proj(x), self.v_proj(x)]
        return out + [self.o_gate_proj(x)] if self.o_gate_proj is not None else out

    @staticmethod
    def kv_layout(config: ModelConfig) -> KVLayout:
        return KVLayout(config.n_layers, config.n_kv_heads, config.head_dim, config.head_dim)

    def forward(self, x, cos, sin, mask: torch.Tensor | None, cache: KVCacheView | None = None):
        b, t, _ = x.shape
        q, k, v, *gate = self._project(x)
        q = q.view(b, t, self.n_heads, self.head_dim)
        k = k.view(b, t, self.n_kv_heads, self.head_dim)
        v = v.view(b, t, self.n_kv_heads, self.head_dim)
        norms = (self.q_norm, self.k_norm) if hasattr(self, "q_norm") else None
        q, k = apply_rope_qk(q, k, cos, sin, norms, self.norm_after_rope)
        if cache is not None:
            out = cache.attend(self.layer_idx, q, k, v, self.scale, **self.cache_options)
        else:
            if self.window is not None:  # token indices, not positions: equal within a sample
                band = causal_mask(t, t, self.window, x.device)
                mask = band if mask is None else mask & band
            out = attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                mask,
                self.scale,
                self.softcap,
                is_causal=mask is None,
            ).transpose(1, 2)
        out = out.reshape(b, t, -1)
        if gate:
            out = out * torch.sigmoid(gate[0])
        return self.o_proj(out)
