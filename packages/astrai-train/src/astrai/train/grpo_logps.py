"""Per-token log-probabilities of a GRPO batch's labelled (completion) tokens: the policy's in
each training micro-batch, and the frozen ones (the behaviour policy before an update, the
reference) without gradients in evaluation mode. Kept apart from the Lightning module
(grpo_module.py), which calls them through its _token_logps and _frozen_logps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .losses import IGNORE_INDEX, label_logps


def token_logps(model, data: dict, idx: torch.Tensor, dynamic: bool = False) -> torch.Tensor:
    """Per-token log-probs (len(idx), T) of the labels of rows ``idx``; 0 where unlabelled.
    Only labelled positions go through the output head. ``dynamic``: the model is compiled,
    and lengths change every micro-batch: compile once for any, not first for one; the
    log-softmax is then compiled too (losses.label_logps), fused instead of run in chunks."""
    labels = data["labels"][idx]
    length = int(data["attention_mask"][idx].sum(1).max())
    # Rows are right-padded: causal attention already keeps real tokens from seeing the
    # padding after them, so no mask is needed (and the fast causal path is used).
    ids, cut = data["input_ids"][idx, :length], labels[:, :length]
    flat = (cut != IGNORE_INDEX).reshape(-1).nonzero().squeeze(1)
    if dynamic:
        torch._dynamo.maybe_mark_dynamic(ids, 1)
        torch._dynamo.maybe_mark_dynamic(flat, 0)
    logits = model(ids, logits_index=flat)
    lp = label_logps(logits, cut.reshape(-1)[flat], compiled=dynamic)  # float32 softmax
    out = lp.new_zeros(cut.numel()).index_put((flat,), lp).view(cut.shape)
    return F.pad(out, (0, labels.shape[1] - length))


@torch.no_grad()
def frozen_logps(
    logps: Callable[..., torch.Tensor], model, data: dict, rows_per_pass: int | None, device: torch.device
) -> torch.Tensor:
    """``logps(model, data, idx)`` over all rows, ``rows_per_pass`` at a time (default: all),
    without gradients and with ``model`` in evaluation mode (no LoRA dropout)."""
    n = data["labels"].shape[0]
    step = rows_per_pass or n
    was_training = model.training
    model.eval()  # no (LoRA) dropout in the behaviour / reference log-probs
    try:
        parts = [logps(model, data, torch.arange(s, min(s + step, n), device=device)) for s in range(0, n, step)]
    finally:
        model.train(was_training)
    return torch.cat(parts)
