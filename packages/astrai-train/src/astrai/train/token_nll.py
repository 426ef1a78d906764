"""Per-token cross-entropy that never holds float32 logits for the whole batch.

Why: `F.cross_entropy(logits.float(), ...)` on bf16 logits makes a float32 copy, log_softmax
saves a float32 output for backward, and backward makes float32 gradients: at 16k tokens x
32k vocab each is 2 GB, at Qwen's 152k vocab 10 GB. This Function works through the rows in
chunks: forward keeps one float32 log-sum-exp per row, backward recomputes a chunk's softmax
from the saved (bf16) logits and writes the gradient in the logits' dtype. The arithmetic is
the same float32 softmax. torch.compile fuses the dense formula itself (losses.py keeps that
for compiled runs).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
_CHUNK_ELEMENTS = 2**25  # float32 scratch of one chunk: 128 MiB


def token_nll(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """-log p(label) per row of (rows, vocab) logits, in float32; 0 where the label is IGNORE_INDEX.

    With label_smoothing e: (1 - e) * nll + e * mean over the vocabulary of -log p (as
    F.cross_entropy's label_smoothing)."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"token_nll takes (rows, vocab) logits and (rows,) labels, got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}"
        )
    return _TokenNLL.apply(logits, labels, float(label_smoothing))


def _chunks(logits: torch.Tensor):
    rows = max(1, _CHUNK_ELEMENTS // logits.shape[1])
    for lo in range(0, logits.shape[0], rows):
        yield lo, min(lo + rows, logits.shape[0])


class _TokenNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, smoothing):
        labelled = labels != IGNORE_INDEX
        index = torch.where(labelled, labels, 0)[:, None]
        lse = logits.new_empty(logits.shape[0], dtype=torch.float32)
        nll = torch.empty_like(lse)
        for lo, hi in _chunks(logits):
            x = logits[lo:hi].float()
            lse[lo:hi] = torch.logsumexp(x, dim=-1)
            nll[lo:hi] = lse[lo:hi] - x.gather(1, index[lo:hi])[:, 0]
            if smoothing:
                nll[lo:hi] = (1 - smoothing) * nll[lo:hi] + smoothing * (lse[lo:hi] - x.mean(-1))
        ctx.save_for_backward(logits, index, labelled, lse)
        ctx.smoothing = smoothing
        return torch.where(labelled, nll, 0.0)

    @staticmethod
    def backward(ctx, grad_nll):
        logits, index, labelled, lse = ctx.saved_tensors
        smoothing, vocab = ctx.smoothing, logits.shape[1]
        scale = torch.where(labelled, grad_nll.float(), 0.0)[:, None]
        grad = torch.empty_like(logits)
        for lo, hi in _chunks(logits):
            g = (logits[lo:hi].float() - lse[lo:hi, None]).exp_()  # softmax
            if smoothing:
                g.sub_(smoothing / vocab)
            g.scatter_add_(1, index[lo:hi], g.new_full((hi - lo, 1), smoothing - 1.0))
            grad[lo:hi] = g.mul_(scale[lo:hi])
        return grad, None, None
