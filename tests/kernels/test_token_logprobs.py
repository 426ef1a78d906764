"""The chosen-token log-prob kernel gives what log_softmax + gather give (float32), for every
row, in float32 and bfloat16 logits, with vocabularies that do and do not fill its blocks."""

import pytest
import torch
from test_paged_attention import check_kernel_interpreted, needs_triton


def check_kernel(device: str) -> None:
    from astrai.core.kernels.token_logprobs import token_logprobs

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for rows, vocab, scale in ((5, 300, 3.0), (3, 4096, 1.0), (4, 9000, 20.0), (1, 1, 1.0)):
            logits = (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * scale).to(dtype)
            logits[0, 0] = 60.0  # a dominant token: its log-prob near 0, the rest far below
            tokens = torch.randint(0, vocab, (rows,), generator=g)
            tokens[0] = 0
            want = torch.log_softmax(logits.double(), -1).gather(1, tokens[:, None])[:, 0]  # float64 reference
            got = token_logprobs(logits.to(device), tokens.to(device)).cpu()
            assert got.dtype == torch.float32
            close = torch.isclose(got.double(), want, rtol=1e-5, atol=1e-4)
            assert close.all(), (dtype, vocab, got, want)
    wide = torch.randn(3, 700, generator=g).to(device)
    narrow = wide[:, :500]  # a row stride wider than the vocabulary (the sampler's vocab_limit slice)
    tokens = torch.tensor([0, 250, 499], device=device)
    want = torch.log_softmax(narrow.double(), -1).gather(1, tokens[:, None])[:, 0]
    torch.testing.assert_close(token_logprobs(narrow, tokens).double(), want, rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the compiled kernel is tested instead")
def test_token_logprob_kernel_matches_log_softmax_in_the_interpreter():
    check_kernel_interpreted("test_token_logprobs")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_token_logprob_kernel_matches_log_softmax_on_the_gpu():
    check_kernel("cuda")
