"""Grammar token masks applied to a step's logits in one Triton launch (structured_output.py).

Why: in torch, unpacking the 32-bit mask words, picking the constrained rows and writing -inf
into them takes about ten kernel launches a step, and a decode step of a large batch is
launch- and host-bound: the host time is what a schema costs its batch-mates. Here one program
per (constrained row, block of the vocabulary) reads its mask bits and writes -inf in place
where a token is not allowed; columns past the mask's width are not allowed either.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 2048


@triton.jit
def _token_mask_kernel(Logits, stride, Masks, words, Rows, vocab, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    row = tl.load(Rows + r).to(tl.int64)
    in_vocab = cols < vocab
    word = tl.load(Masks + r * words + cols // 32, mask=in_vocab & (cols // 32 < words), other=0)
    allowed = ((word >> (cols % 32)) & 1) != 0
    ptr = Logits + row * stride + cols
    x = tl.load(ptr, mask=in_vocab, other=0.0)
    tl.store(ptr, tl.where(allowed, x, float("-inf")), mask=in_vocab)


def apply_token_masks(logits: torch.Tensor, masks: torch.Tensor, rows: torch.Tensor) -> None:
    """In place: row rows[i] of logits (B, V; unit last stride) keeps the tokens whose bit is set
    in masks[i] (int32 words, bit j of word w is token 32 * w + j) and gets -inf elsewhere."""
    n, words = masks.shape
    vocab = logits.shape[-1]
    grid = (n, triton.cdiv(vocab, _BLOCK))
    _token_mask_kernel[grid](logits, logits.stride(0), masks, words, rows, vocab, BLOCK=_BLOCK, num_warps=4)
