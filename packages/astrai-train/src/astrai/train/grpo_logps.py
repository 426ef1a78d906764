"""Per-token log-probabilities of a GRPO batch's labelled (completion) tokens: the policy's in
each training micro-batch, and the frozen ones (the behaviour policy before an update, the
reference) without gradients in evaluation mode. Kept apart from the Lightning module
(grpo_module.py), which calls them through its _token_logps and _frozen_logps.

Micro-batches are cut on the host (BatchLayout): a micro-batch's length and its labelled
positions decide tensor shapes, and reading them from the device would make the host wait for
every queued kernel, twice per micro-batch, leaving the GPU idle while the next forward is
launched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .losses import IGNORE_INDEX, label_logps


@dataclass(frozen=True)
class RowCut:
    """Rows of a batch to run through the policy together."""

    index: torch.Tensor  # (rows,) row numbers, on the batch's device
    length: int  # tokens of the longest of these rows: the block is (rows, length)
    flat: torch.Tensor  # labelled positions of the (rows, length) block, flattened, on the device


class BatchLayout:
    """Each row's length and labelled positions, copied to the host once per batch (one wait),
    so that cutting micro-batches asks the device nothing."""

    def __init__(self, data: dict):
        labels = data["labels"]
        self.device = labels.device
        lengths = data["attention_mask"].sum(1, keepdim=True).to(torch.long)
        host = torch.cat([lengths, (labels != IGNORE_INDEX).long()], 1).cpu()
        self.lengths = host[:, 0]  # (N,) tokens of each row
        self.labelled = host[:, 1:].bool()  # (N, T)

    @property
    def num_rows(self) -> int:
        return self.lengths.shape[0]

    def labelled_tokens(self, rows: torch.Tensor | None = None) -> int:
        """Labelled (completion) tokens of ``rows`` (host row numbers; default: all)."""
        return int((self.labelled if rows is None else self.labelled[rows]).sum())

    def cut(self, rows: torch.Tensor) -> RowCut:
        """The cut of ``rows`` (host row numbers), with its tensors sent to the device without
        waiting (from pinned memory)."""
        length = int(self.lengths[rows].max())
        flat = self.labelled[rows, :length].reshape(-1).nonzero().squeeze(1)
        return RowCut(self._send(rows), length, self._send(flat))

    def _send(self, host: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return host.to(self.device)
        return host.pin_memory().to(self.device, non_blocking=True)


def token_logps(model, data: dict, cut: RowCut, dynamic: bool = False) -> torch.Tensor:
    """Per-token log-probs (rows, T) of the labels of the rows ``cut`` holds (BatchLayout.cut);
    0 where unlabelled. Only labelled positions go through the output head. ``dynamic``: the
    model is compiled, and lengths change every micro-batch: compile once for any, not first
    for one; the log-softmax is then compiled too (losses.label_logps), fused instead of run in
    chunks."""
    labels = data["labels"][cut.index]
    # Rows are right-padded: causal attention already keeps real tokens from seeing the
    # padding after them, so no mask is needed (and the fast causal path is used).
    ids, block = data["input_ids"][cut.index, : cut.length], labels[:, : cut.length]
    flat = cut.flat
    if dynamic:
        torch._dynamo.maybe_mark_dynamic(ids, 1)
        torch._dynamo.maybe_mark_dynamic(flat, 0)
    logits = model(ids, logits_index=flat)
    lp = label_logps(logits, block.reshape(-1)[flat], compiled=dynamic)  # float32 softmax
    out = lp.new_zeros(block.numel()).index_put((flat,), lp).view(block.shape)
    return F.pad(out, (0, labels.shape[1] - cut.length))


@torch.no_grad()
def frozen_logps(
    logps: Callable[..., torch.Tensor], model, layout: BatchLayout, data: dict, rows_per_pass: int | None
) -> torch.Tensor:
    """``logps(model, data, cut)`` over all rows, ``rows_per_pass`` at a time (default: all),
    without gradients and with ``model`` in evaluation mode (no LoRA dropout)."""
    n = layout.num_rows
    step = rows_per_pass or n
    was_training = model.training
    model.eval()  # no (LoRA) dropout in the behaviour / reference log-probs
    try:
        parts = [logps(model, data, layout.cut(torch.arange(s, min(s + step, n)))) for s in range(0, n, step)]
    finally:
        model.train(was_training)
    return torch.cat(parts)
