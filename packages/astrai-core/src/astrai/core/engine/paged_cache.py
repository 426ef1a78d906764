"""The page pool that holds every layer's keys and values, and the cache view the model sees.

Storage is one preallocated tensor per kind, (layers, pages * page_size, kv_heads, dim): a
layer's pool is a view of it and a token's slot is page * page_size + offset. For multi-head
latent attention (layout.v_from_k) only the latent is stored; values are its first v_dim
channels.
"""

from __future__ import annotations

import torch

from ..kv_cache_view import KVLayout
from .attention import AttentionBackend, AttentionMetadata, TorchPagedAttention


class PagedKVCache:
    def __init__(self, layout: KVLayout, num_pages: int, page_size: int, dtype: torch.dtype, device):
        self.layout, self.num_pages, self.page_size = layout, num_pages, page_size
        slots = num_pages * page_size
        self.k = torch.zeros(layout.n_layers, slots, layout.n_kv_heads, layout.k_dim, dtype=dtype, device=device)
        self.v = None
        if not layout.v_from_k:
            self.v = torch.zeros(layout.n_layers, slots, layout.n_kv_heads, layout.v_dim, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_page(layout: KVLayout, page_size: int, dtype: torch.dtype) -> int:
        return layout.bytes_per_token(torch.empty((), dtype=dtype).element_size()) * page_size

    def copy_pages(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole pages src -> dst in every layer (copy-on-write of a shared last page)."""
        if not pairs:
            return
        offsets = torch.arange(self.page_size, device=self.k.device)
        src = torch.tensor([s for s, _ in pairs], device=self.k.device)[:, None] * self.page_size + offsets
        dst = torch.tensor([d for _, d in pairs], device=self.k.device)[:, None] * self.page_size + offsets
        for pool in (self.k, self.v) if self.v is not None else (self.k,):
            pool[:, dst.flatten()] = pool[:, src.flatten()]

    def view(self, meta: AttentionMetadata, backend: AttentionBackend | None = None) -> "PagedCacheView":
        return PagedCacheView(self, meta, backend or TorchPagedAttention())


class PagedCacheView:
    """KVCacheView for one step: writes the new keys/values into their slots, then attends."""

    def __init__(self, cache: PagedKVCache, meta: AttentionMetadata, backend: AttentionBackend):
        self.cache, self.meta, self.backend = cache, meta, backend
        self.state = backend.prepare(meta)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, scale: float):
        if q.shape[0] != 1:
            raise ValueError(f"the paged cache expects one flattened row of tokens, got batch {q.shape[0]}")
        k_pool = self.cache.k[layer_idx]
        k_pool.index_copy_(0, self.meta.slot_mapping, k[0].to(k_pool.dtype))
        if self.cache.v is None:
            v_pool = k_pool[..., : self.cache.layout.v_dim]
        else:
            v_pool = self.cache.v[layer_idx]
            v_pool.index_copy_(0, self.meta.slot_mapping, v[0].to(v_pool.dtype))
        return self.backend(q[0], k_pool, v_pool, self.state, scale).unsqueeze(0)
