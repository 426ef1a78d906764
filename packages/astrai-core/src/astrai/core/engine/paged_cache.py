"""The page pool that holds every layer's keys and values, and the cache view the model sees.

Storage is one preallocated tensor per kind, (layers, pages, page_size, kv_heads, dim): a
layer's pool is a view of it, and a token's flat slot is page * page_size + offset. For multi-head
latent attention (layout.v_from_k) only the latent is stored; values are its first v_dim
channels.

One page more than num_pages is stored: the scratch page. The allocator hands out pages
0..num_pages-1 only, so nothing ever reads it; the padding rows of a bucketed decode step
(cuda_graphs.py) write their keys/values there instead of into a live page.

The pool may store keys and values in fewer bytes than the model computes in (kv_dtype.py).
"""

from __future__ import annotations

import torch

from ..errors import AstraiError
from ..kernels.dispatch import use_fused
from ..kv_cache_view import KVLayout
from ..sizes import parse_bytes
from .attention_backend import AttentionBackend, AttentionMetadata, default_backend
from .device_transfer import to_device
from .kv_dtype import as_bytes, to_pool_dtype


class PagedKVCache:
    def __init__(self, layout: KVLayout, num_pages: int, page_size: int, dtype: torch.dtype, device):
        self.layout, self.num_pages, self.page_size = layout, num_pages, page_size
        self.scratch_page = num_pages
        shape = (layout.n_layers, num_pages + 1, page_size, layout.n_kv_heads)
        self.k = torch.zeros(*shape, layout.k_dim, dtype=dtype, device=device)
        self.v = None if layout.v_from_k else torch.zeros(*shape, layout.v_dim, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_page(layout: KVLayout, page_size: int, dtype: torch.dtype) -> int:
        return layout.bytes_per_token(torch.empty((), dtype=dtype).element_size()) * page_size

    def copy_pages(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole pages src -> dst in every layer (copy-on-write of a shared last page)."""
        if not pairs:
            return
        (moved,) = to_device([torch.tensor(pairs, dtype=torch.long)], self.k.device)
        src, dst = moved[:, 0], moved[:, 1]
        for pool in (self.k, self.v) if self.v is not None else (self.k,):
            pool = as_bytes(pool)
            pool[:, dst] = pool[:, src]

    def view(self, meta: AttentionMetadata, backend: AttentionBackend | None = None) -> PagedCacheView:
        return PagedCacheView(self, meta, backend or default_backend(self.k.device))


class PagedCacheView:
    """KVCacheView for one step: writes the new keys/values into their slots, then attends."""

    def __init__(self, cache: PagedKVCache, meta: AttentionMetadata, backend: AttentionBackend):
        self.cache, self.meta, self.backend = cache, meta, backend
        self.state = backend.prepare(meta)

    def attend(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor | None,
        scale: float,
        window: int | None = None,
        softcap: float | None = None,
    ):
        if q.shape[0] != 1:
            raise ValueError(f"the paged cache expects one flattened row of tokens, got batch {q.shape[0]}")
        k_pool = self.cache.k[layer_idx]
        v_pool = self.cache.v[layer_idx] if self.cache.v is not None else None
        self._store(k[0], v[0] if v_pool is not None else None, k_pool, v_pool)
        # Gemma 2's options reach the backend only when set: a backend without them serves other models.
        options = {k: v for k, v in (("window", window), ("softcap", softcap)) if v is not None}
        out = self.backend(q[0], k_pool, v_pool, self.state, scale, self.cache.layout.v_dim, **options)
        return out.unsqueeze(0)

    def _store(self, k, v, k_pool, v_pool) -> None:
        """The new keys/values into their slots: one fused launch on CUDA, index_copy_ elsewhere."""
        if use_fused(k):
            from ..kernels import store_kv

            if store_kv.supports(k, v, k_pool, v_pool):
                store_kv.store_kv(k, v, k_pool, v_pool, self.meta.slot_mapping)
                return
        for x, pool in ((k, k_pool), (v, v_pool)) if v is not None else ((k, k_pool),):
            as_bytes(pool.flatten(0, 1)).index_copy_(0, self.meta.slot_mapping, as_bytes(to_pool_dtype(x, pool.dtype)))


def pool_pages(num_pages, kv_cache_memory, per_page: int, wanted: int, device: torch.device) -> int:
    """Pages in the pool: given, from a byte budget, or `wanted` capped by memory (90% of free GPU
    memory on CUDA, 1 GiB elsewhere)."""
    if num_pages is not None:
        if not (isinstance(num_pages, int) and not isinstance(num_pages, bool) and num_pages >= 1):
            raise AstraiError(f"num_pages must be a positive integer, got {num_pages!r}")
        if kv_cache_memory is not None:
            raise AstraiError("kv_cache_memory cannot be combined with num_pages; give one")
        return num_pages
    if kv_cache_memory is not None:
        budget = parse_bytes(kv_cache_memory, "kv_cache_memory")
        if budget < per_page:
            raise AstraiError(f"kv_cache_memory ({budget} bytes) is smaller than one KV page ({per_page} bytes)")
        return budget // per_page
    free = int(0.9 * torch.cuda.mem_get_info(device)[0]) if device.type == "cuda" else 2**30
    return max(1, min(wanted, free // per_page))
