"""The grammar-mask kernel writes -inf exactly where the torch ops (structured_output.mask_rows)
do, and touches no other row."""

import pytest
import torch
from test_paged_attention import check_kernel_interpreted, needs_triton

from astrai.core.engine.structured_output import mask_rows


def check_kernel(device: str) -> None:
    """apply_token_masks against mask_rows on random logits and mask words, in place."""
    from astrai.core.kernels.token_mask import apply_token_masks

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for vocab, words in ((100, 4), (5000, 157), (70, 2)):  # exact, wider mask, logits wider than the mask
            logits = torch.randn(6, vocab, generator=g).to(dtype).to(device)
            masks = torch.randint(-(2**31), 2**31 - 1, (3, words), generator=g, dtype=torch.int64)
            masks = masks.to(torch.int32).to(device)
            rows = torch.tensor([4, 0, 2], dtype=torch.int32, device=device)
            want = logits.clone()
            mask_rows(want, masks, rows.long(), {})
            got = logits.clone()
            apply_token_masks(got, masks, rows)
            assert torch.equal(got, want), (dtype, vocab, words)
            assert torch.equal(got[[1, 3, 5]], logits[[1, 3, 5]])


def test_mask_rows_keeps_exactly_the_set_bits():
    logits = torch.arange(40, dtype=torch.float64).reshape(2, 20)
    masks = torch.tensor([[0b1011]], dtype=torch.int32)  # tokens 0, 1 and 3
    mask_rows(logits, masks, torch.tensor([1]), {})
    assert logits[0].tolist() == list(range(20))
    kept = [i for i, x in enumerate(logits[1].tolist()) if x != float("-inf")]
    assert kept == [0, 1, 3]


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the compiled kernel is tested instead")
def test_mask_kernel_matches_the_torch_ops_in_the_interpreter():
    check_kernel_interpreted("test_token_mask")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mask_kernel_matches_the_torch_ops_on_the_gpu():
    check_kernel("cuda")
