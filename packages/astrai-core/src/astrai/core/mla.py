"""Multi-head latent attention (DeepSeek-V2 style).

Keys and values are compressed into one low-rank latent per token plus a small shared
rotary key. Training expands the latent into per-head keys/values. With a cache, the
up-projections are absorbed into the query and the output, so attention runs directly on
the cached latent: the cache stores kv_lora_rank + qk_rope_head_dim numbers per token and
layer instead of 2 x heads x head_dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .kv_cache_view import KVCacheView, KVLayout
from .norm import RMSNorm
from .rope import apply_rope_qk


class LatentAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.n_heads
        self.nope, self.rope, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.rank = config.kv_lora_rank
        self.scale = (self.nope + self.rope) ** -0.5
        q_out = self.n_heads * (self.nope + self.rope)
        if config.q_lora_rank:
            self.q_a_proj = nn.Linear(config.dim, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, q_out, bias=False)
        else:
            self.q_proj = nn.Linear(config.dim, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(config.dim, self.rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.rank, config.norm_eps)
        self.kv_b_proj = nn.Linear(self.rank, self.n_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, config.dim, bias=False)
        self.o_gate_proj = nn.Linear(config.dim, self.n_heads * self.v_dim, bias=False) if config.gated_attn else None

    @staticmethod
    def kv_layout(config: ModelConfig) -> KVLayout:
        k_dim = config.kv_lora_rank + config.qk_rope_head_dim
        return KVLayout(config.n_layers, 1, k_dim, config.kv_lora_rank, v_from_k=True)

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(self, x, cos, sin, mask: torch.Tensor | None, cache: KVCacheView | None = None):
        b, t, _ = x.shape
        q = self._queries(x).view(b, t, self.n_heads, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)
        q_pe, k_pe = apply_rope_qk(q_pe, k_pe.view(b, t, 1, self.rope), cos, sin)
        if cache is None:
            out = self._expanded(q_nope, q_pe, latent, k_pe, mask)
        else:
            out = self._absorbed(q_nope, q_pe, latent, k_pe, cache)
        out = out.reshape(b, t, -1)
        if self.o_gate_proj is not None:
            out = out * torch.sigmoid(self.o_gate_proj(x))
        return self.o_proj(out)

    def _expanded(self, q_nope, q_pe, latent, k_pe, mask):
        b, t = latent.shape[:2]
        kv = self.kv_b_proj(latent).view(b, t, self.n_heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(-1, -1, self.n_heads, -1)], dim=-1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.scale,
        )
        return out.transpose(1, 2)

    def _absorbed(self, q_nope, q_pe, latent, k_pe, cache: KVCacheView):
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.rank)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope :]
        q_latent = torch.einsum("bthn,hnr->bthr", q_nope, w_uk)
        q = torch.cat([q_latent, q_pe], dim=-1)
        k = torch.cat([latent.unsqueeze(2), k_pe], dim=-1)
        out_latent = cache.attend(self.layer_idx, q, k, None, self.scale)
        return torch.einsum("bthr,hvr->bthv", out_latent, w_uv)
