"""Scaled dot-product attention with what torch's SDPA lacks: soft-capped logits, sliding windows.

Why this exists: Gemma 2 squashes every attention score s into cap * tanh(s / cap) before the
softmax (`attn_logit_softcapping`), which F.scaled_dot_product_attention cannot do, and its
sliding layers see only the last `sliding_window` keys. The model's own attention, the small
contiguous cache and the paged engine's torch path all call `attention` and `causal_mask` here,
so the three agree; without a soft-cap `attention` is exactly the SDPA call it replaces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """softmax(cap(q k^T * scale) masked) v for q ([B,] H, Tq, Dk), k ([B,] Hkv, L, Dk), v ([B,] Hkv, L, Dv).

    mask: boolean, True where a query may attend, broadcastable to (B, H, Tq, L); or None with
    is_causal (the last Tq keys are the queries') or without (every key). Heads are grouped as
    in SDPA's enable_gqa: query head h reads KV head h // (H // Hkv)."""
    if softcap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=True
        )
    group = q.shape[-3] // k.shape[-3]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if is_causal and mask is None:
        mask = causal_mask(q.shape[-2], k.shape[-2], None, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(q.dtype)
    return torch.matmul(probs, v)


def causal_mask(n_queries: int, n_keys: int, window: int | None, device) -> torch.Tensor:
    """(n_queries, n_keys) boolean mask of the newest n_queries tokens of an n_keys context: query
    i (at position n_keys - n_queries + i) sees keys up to its own position, and with a window only
    the last `window` of them (keys j with position - window < j)."""
    offset = n_keys - n_queries
    ones = torch.ones(n_queries, n_keys, dtype=torch.bool, device=device)
    mask = ones.tril(offset)
    if window is not None:
        mask = mask & ~ones.tril(offset - window)
    return mask
