"""The KV pool's storage dtype: the model's own ("auto"), or float8 e4m3 ("fp8").

An fp8 pool holds twice the tokens of a bf16 one, and a decode step at a large batch, which
reads mostly cached keys and values, gets faster, though by less than the halved bytes suggest:
the decode attention kernel pays per key tile as well as per byte (measured: see
bench/RESULTS.md, 2026-11-26 `bench/paged_attention.py` fp8 / bf16 rows). Values are rounded
to e4m3 with no scale (3 mantissa bits, ~2 significant digits) after clamping to its range,
+-448; attention converts them back to the model's dtype as it reads them. Torch lacks some
copy ops for float8 on some devices, so fp8 pages are copied as bytes.
"""

from __future__ import annotations

import torch

from ..errors import AstraiError

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3's largest finite value
KV_CACHE_DTYPES = ("auto", "fp8")


def pool_dtype(kv_cache_dtype: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The pool's dtype for a kv_cache_dtype setting: "auto" (the model's dtype) or "fp8"."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise AstraiError(
            f"kv_cache_dtype must be one of {', '.join(map(repr, KV_CACHE_DTYPES))}, got {kv_cache_dtype!r}"
        )
    if kv_cache_dtype == "auto":
        return model_dtype
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise AstraiError(
            f"kv_cache_dtype 'fp8' needs a GPU with float8 support (compute capability 8.9+: "
            f"Ada, Hopper); {torch.cuda.get_device_name(device)} has none; use 'auto'"
        )
    return FP8


def to_pool_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in the pool's dtype; for fp8 clamped to its range first (no overflow to NaN)."""
    if dtype == FP8:
        return x.clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return x.to(dtype)


def as_bytes(x: torch.Tensor) -> torch.Tensor:
    """A one-byte (fp8) tensor as uint8, for the copy ops torch lacks for float8 on some devices."""
    return x.view(torch.uint8) if x.dtype == FP8 else x
