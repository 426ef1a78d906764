"""Attention masks for padded and packed batches."""

from __future__ import annotations

import torch


def default_position_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """0..T-1 per row, or counted over the non-padding tokens when a padding mask is given."""
    if attention_mask is None or attention_mask.dim() != 2:
        t = input_ids.shape[1]
        return torch.arange(t, device=input_ids.device).expand(input_ids.shape[0], t)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def build_attention_mask(
    position_ids: torch.Tensor, attention_mask: torch.Tensor | None, packed: bool
) -> torch.Tensor | None:
    """Boolean (batch, 1, T, T) mask where True means "may attend", or None for plain causal attention.

    - attention_mask (batch, T), 1 = real token, 0 = padding: keys that are padding are hidden.
    - packed: several samples share a row; a sample starts where position_ids restart at 0,
      and attention never crosses into another sample.
    - attention_mask (batch, 1, T, T) boolean is taken as given.
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask.bool()
    if attention_mask is None and not packed:
        return None
    b, t = position_ids.shape
    device = position_ids.device
    causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    mask = causal.expand(b, t, t)
    if packed:
        starts = (position_ids == 0).long()
        segment = starts.cumsum(-1)
        mask = mask & (segment[:, :, None] == segment[:, None, :])
    if attention_mask is not None:
        keep = attention_mask.bool()
        mask = mask & keep[:, None, :]
        # A padding query row would attend to nothing (NaN in softmax): let it see itself.
        mask = mask | torch.eye(t, dtype=torch.bool, device=device)
    return mask.unsqueeze(1)


def has_packed_samples(position_ids: torch.Tensor) -> bool:
    """True when some row restarts its positions after the first token (packed samples)."""
    return bool((position_ids[:, 1:] == 0).any())
