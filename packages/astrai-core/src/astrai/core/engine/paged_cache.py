"""The page pool that holds every layer's keys and values, and the cache view the model sees.

Storage is one preallocated tensor per kind, (layers, pages, page_size, kv_heads, dim): a
layer's pool is a view of it, and a token's flat slot is page * page_size + offset. For multi-head
latent attention (layout.v_from_k) only the latent is stored; values are its first v_dim
channels.

One page more than num_pages is stored: the scratch page. The allocator hands out pages
0..num_pages-1 only, so nothing ever reads it; the padding rows of a bucketed decode step
(cuda_graphs.py) write their keys/values there instead of into a live page.

The pool may hold fewer bytes than the model computes in (kv_cache_dtype="fp8": float8 e4m3,
half of bf16): a decode step at a large batch reads mostly cached keys and values, so its time
halves with their bytes, and twice the tokens fit. Values are rounded to e4m3 with no scale
(3 mantissa bits, ~2 significant digits) and clamped to its range, +-448; attention converts
them back to the model's dtype as it reads them.
"""

from __future__ import annotations

import re

import torch

from ..kernels.dispatch import use_fused
from ..kv_cache_view import KVLayout
from .attention import AttentionBackend, AttentionMetadata, default_backend
from .transfer import to_device


FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3's largest finite value
KV_CACHE_DTYPES = ("auto", "fp8")


def pool_dtype(kv_cache_dtype: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The pool's dtype for a kv_cache_dtype setting: "auto" (the model's dtype) or "fp8"."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(map(repr, KV_CACHE_DTYPES))}, "
                         f"got {kv_cache_dtype!r}")
    if kv_cache_dtype == "auto":
        return model_dtype
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError(f"kv_cache_dtype 'fp8' needs a GPU with float8 support (compute capability 8.9+: "
                         f"Ada, Hopper); {torch.cuda.get_device_name(device)} has none; use 'auto'")
    return FP8


def to_pool_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in the pool's dtype; for fp8 clamped to its range first (no overflow to NaN)."""
    if dtype == FP8:
        return x.clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return x.to(dtype)


def as_bytes(x: torch.Tensor) -> torch.Tensor:
    """A one-byte (fp8) tensor as uint8, for the copy ops torch lacks for float8 on some devices."""
    return x.view(torch.uint8) if x.dtype == FP8 else x


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
        v_pool = self.cache.v[layer_idx] if self.cache.v is not None else None
        self._store(k[0], v[0] if v_pool is not None else None, k_pool, v_pool)
        out = self.backend(q[0], k_pool, v_pool, self.state, scale, self.cache.layout.v_dim)
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


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | str) -> int:
    """2147483648, "2GiB", "512 MiB", "1.5GB" -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"kv_cache_memory must be a positive byte count or a size like '2GiB' / '512MB', got {value!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def pool_pages(num_pages, kv_cache_memory, per_page: int, wanted: int, device: torch.device) -> int:
    """Pages in the pool: given, from a byte budget, or `wanted` capped by memory (90% of free GPU
    memory on CUDA, 1 GiB elsewhere)."""
    if num_pages is not None:
        if not (isinstance(num_pages, int) and not isinstance(num_pages, bool) and num_pages >= 1):
            raise ValueError(f"num_pages must be a positive integer, got {num_pages!r}")
        if kv_cache_memory is not None:
            raise ValueError("kv_cache_memory cannot be combined with num_pages; give one")
        return num_pages
    if kv_cache_memory is not None:
        budget = parse_bytes(kv_cache_memory)
        if budget < per_page:
            raise ValueError(f"kv_cache_memory ({budget} bytes) is smaller than one KV page ({per_page} bytes)")
        return budget // per_page
    free = int(0.9 * torch.cuda.mem_get_info(device)[0]) if device.type == "cuda" else 2**30
    return max(1, min(wanted, free // per_page))
