"""Gradient accumulation in float32 for bf16 weights (param_dtype: bfloat16).

With bf16 weights autograd adds every backward's gradients into bf16 `.grad` tensors, so
summing several micro-batches rounds at each addition (8 significant bits) and small
contributions vanish. Float32Grads moves each backward's gradients into one float32 buffer and,
before the optimizer step, puts the sum back into `.grad` rounded to bf16 once: the precision of
a single bf16 backward, whatever the number of micro-batches. Clipping, logging and the
optimizer (MasterWeightAdamW) then see ordinary gradients.

Under DDP, Lightning skips the gradient all-reduce on every micro-batch but the last (no_sync),
so the buffer then holds this rank's own sum plus the averaged last one: `release` takes a
function that averages the buffer over the ranks in place (averaging the already-averaged part
leaves it as it is). That is one float32 all-reduce per optimizer step on top of DDP's own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class Float32Grads:
    """A float32 sum of the gradients of `params` over several backward passes."""

    def __init__(self, params: list[nn.Parameter]):
        if not params:
            raise ValueError("Float32Grads needs at least one parameter")
        self.params = params
        self.sizes = [p.numel() for p in params]
        dtypes = {p.dtype for p in params}
        self.dtype = dtypes.pop() if len(dtypes) == 1 else None  # the parameters' one dtype, if they share one
        self.buffer: torch.Tensor | None = None  # made on first use, on the parameters' device
        self.sums: list[torch.Tensor] = []
        self.seen = [False] * len(params)  # parameters that got a gradient since the last release

    def collect(self) -> None:
        """Add the parameters' current gradients to the sum and clear them (after a backward)."""
        if self.buffer is None:
            self.buffer = torch.zeros(sum(self.sizes), dtype=torch.float32, device=self.params[0].device)
            self.sums = [s.view_as(p) for s, p in zip(self.buffer.split(self.sizes), self.params)]
        got = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not got:
            return
        # One call for all of them instead of a Python loop of hundreds of adds per backward.
        torch._foreach_add_([self.sums[i] for i in got], [self.params[i].grad for i in got])
        for i in got:
            self.params[i].grad = None
            self.seen[i] = True

    @property
    def pending(self) -> bool:
        return any(self.seen)

    def release(self, average_over_ranks: Callable[[torch.Tensor], None] | None = None) -> None:
        """Put the sum back into `.grad` (in each parameter's dtype) and start a new sum; a
        parameter that got no gradient keeps none. No-op when nothing was collected."""
        if not self.pending:
            return
        if average_over_ranks is not None:
            average_over_ranks(self.buffer)
        # With one dtype (the usual case), one cast of the whole buffer, whose views become the
        # grads; else a cast per parameter. Copies either way: the buffer is zeroed next.
        shared = self.dtype is not None
        rounded = self.buffer.to(self.dtype, copy=True).split(self.sizes) if shared else self.sums
        for i, p in enumerate(self.params):
            if self.seen[i]:
                p.grad = rounded[i].view_as(p).to(p.dtype, copy=not shared)
        self.buffer.zero_()
        self.seen = [False] * len(self.params)
