"""The page pool that holds every layer's keys and values, and the cache view the model sees.

Storage is one preallocated tensor per kind, (layers, pages, page_size, kv_heads, dim): a
layer's pool is a view of it, and a token's flat slot is page * page_size + offset. For multi-head
latent attention (layout.v_from_k) only the latent is stored; values are its first v_dim
channels.
"""

from __future__ import annotations

import torch

from ..kv_cache_view import KVLayout
from .attention import AttentionBackend, AttentionMetadata, default_backend


class PagedKVCache:
    def __init__(self, layout: KVLayout, num_pages: int, page_size: int, dtype: torch.dtype, device):
        self.layout, self.num_pages, self.page_size = layout, num_pages, page_size
        shape = (layout.n_layers, num_pages, page_size, layout.n_kv_heads)
        self.k = torch.zeros(*shape, layout.k_dim, dtype=dtype, device=device)
        self.v = None if layout.v_from_k else torch.zeros(*shape, layout.v_dim, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_page(layout: KVLayout, page_size: int, dtype: torch.dtype) -> int:
        return layout.bytes_per_token(torch.empty((), dtype=dtype).element_size()) * page_size

    def copy_pages(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole pages src -> dst in every layer (copy-on-write of a shared last page)."""
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], device=self.k.device)
        dst = torch.tensor([d for _, d in pairs], device=self.k.device)
        for pool in (self.k, self.v) if self.v is not None else (self.k,):
            pool[:, dst] = pool[:, src]

    def view(self, meta: AttentionMetadata, backend: AttentionBackend | None = None) -> "PagedCacheView":
        return PagedCacheView(self, meta, backend or default_backend(self.k.device))


class PagedCacheView:
    """KVCacheView for one step: writes the new keys/values into their slots, then attends."""

    def __init__(self, cache: PagedKVCache, meta: AttentionMetadata, backend: AttentionBackend):
        self.cache, self.meta, self.backend = cache, meta, backend
        self.state = backend.prepare(meta)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, scale: float):
        if q.shape[0] != 1:
            raise ValueError(f"the paged cache expects one flattened row of tokens, got batch {q.shape[0]}")
        k_pool = self.cache.k[layer_idx]
        k_pool.flatten(0, 1).index_copy_(0, self.meta.slot_mapping, k[0].to(k_pool.dtype))
        v_pool = None
        if self.cache.v is not None:
            v_pool = self.cache.v[layer_idx]
            v_pool.flatten(0, 1).index_copy_(0, self.meta.slot_mapping, v[0].to(v_pool.dtype))
        out = self.backend(q[0], k_pool, v_pool, self.state, scale, self.cache.layout.v_dim)
        return out.unsqueeze(0)
