"""The contract between the model's attention layers and a key/value cache.

Attention layers never own cache storage. When a forward pass is given a cache view,
each layer hands it the new (already rotated) queries, keys and values and gets back the
attention output over everything cached so far. The paged cache of the inference engine
and the small contiguous cache below both implement this one method, so there is a single
copy of the model code for training, testing and serving.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .attention_ops import attention, causal_mask


@dataclass(frozen=True)
class KVLayout:
    """What one layer stores per token.

    n_kv_heads x k_dim for keys and n_kv_heads x v_dim for values. When v_from_k is True
    (multi-head latent attention) the values are the first v_dim channels of the keys and
    are not stored separately: the cache holds only the compressed latent.
    """

    n_layers: int
    n_kv_heads: int
    k_dim: int
    v_dim: int
    v_from_k: bool = False

    def bytes_per_token(self, element_size: int) -> int:
        per_layer = self.n_kv_heads * (self.k_dim + (0 if self.v_from_k else self.v_dim))
        return self.n_layers * per_layer * element_size


class KVCacheView(Protocol):
    def attend(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor | None,
        scale: float,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """Store k/v for the new tokens, attend q over the cache; q (B, T, H, Dk) -> (B, T, H, Dv).

        window: a query sees only the last `window` keys up to its own (sliding layers);
        softcap: scores s become softcap * tanh(s / softcap) before the softmax (Gemma 2). Layers
        pass these only when set."""
        ...


class ContiguousKVCache:
    """A simple per-batch cache: all rows share one length. For tests and plain generation loops."""

    def __init__(self, layout: KVLayout):
        self.layout = layout
        self.keys: list[torch.Tensor | None] = [None] * layout.n_layers
        self.values: list[torch.Tensor | None] = [None] * layout.n_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[1]

    def attend(self, layer_idx, q, k, v, scale, window=None, softcap=None):
        if self.keys[layer_idx] is not None:
            k = torch.cat([self.keys[layer_idx], k], dim=1)
            if v is not None:
                v = torch.cat([self.values[layer_idx], v], dim=1)
        self.keys[layer_idx], self.values[layer_idx] = k, v
        if v is None:
            v = k[..., : self.layout.v_dim]
        t_new, t_all = q.shape[1], k.shape[1]
        # New queries sit at the end: query i sees keys up to (t_all - t_new + i).
        mask = causal_mask(t_new, t_all, window, q.device)
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, scale, softcap)
        return out.transpose(1, 2)
