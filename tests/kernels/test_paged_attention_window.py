"""Paged attention with Gemma 2's sliding window and soft-capped scores: the torch reference and the
engine's torch backend against dense float64 math, the Triton kernel against the reference (on CUDA,
and on the CPU through Triton's interpreter)."""

import textwrap

import pytest
import torch
from test_paged_attention import make_case, needs_triton, run_interpreted

from astrai.core.engine.attention_backend import TorchPagedAttention, build_metadata
from astrai.core.kernels.paged_attention import paged_attention_reference

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# (window, softcap): each alone, both, and a window wider than every context (no effect).
OPTIONS = [(5, None), (None, 2.0), (7, 3.0), (1000, None)]


def dense_windowed(q, k_cache, v_cache, table, seq_lens, query_start, scale, window, softcap):
    """Each query written out in float64: keys pos - window < j <= pos, scores soft-capped."""
    page_size, n_heads, n_kv = k_cache.shape[1], q.shape[1], k_cache.shape[2]
    out = torch.zeros(q.shape[0], n_heads, v_cache.shape[-1], dtype=torch.float64)
    for b in range(len(seq_lens)):
        ctx, lo, hi = int(seq_lens[b]), int(query_start[b]), int(query_start[b + 1])
        for i, t in enumerate(range(lo, hi)):
            pos = ctx - (hi - lo) + i
            first = 0 if window is None else max(0, pos - window + 1)
            slots = [(int(table[b, j // page_size]), j % page_size) for j in range(first, pos + 1)]
            for h in range(n_heads):
                kvh = h // (n_heads // n_kv)
                keys = torch.stack([k_cache[p, s, kvh] for p, s in slots]).double()
                vals = torch.stack([v_cache[p, s, kvh] for p, s in slots]).double()
                scores = keys @ q[t, h].double() * scale
                if softcap is not None:
                    scores = softcap * torch.tanh(scores / softcap)
                out[t, h] = torch.softmax(scores, 0) @ vals
    return out


@pytest.mark.parametrize("window,softcap", OPTIONS)
def test_reference_with_a_window_and_softcap_matches_dense_math(window, softcap):
    case = make_case([1, 6, 3, 1], [9, 6, 20, 3], n_heads=4, n_kv_heads=2, dk=12, dv=6, page_size=4)
    got = paged_attention_reference(*case, scale=0.7, window=window, softcap=softcap)
    assert torch.allclose(got, dense_windowed(*case, scale=0.7, window=window, softcap=softcap), atol=1e-12)
    if window != 1000:  # the option changes the result: the test would see it ignored
        assert not torch.allclose(got, paged_attention_reference(*case, scale=0.7), atol=1e-3)


@pytest.mark.parametrize("window,softcap", OPTIONS)
def test_torch_backend_windows_decode_and_prefill_rows_like_the_reference(window, softcap):
    """The engine's CPU backend: one-token rows batched in one call, prefill chunks with history."""
    q_lens, ctx = [1, 6, 1, 3, 1], [9, 6, 20, 17, 2]
    q, k, v, table, seq_lens, query_start = make_case(q_lens, ctx, 4, 2, 12, 6, page_size=4)
    pages = [table[b, : -(-c // 4)].tolist() for b, c in enumerate(ctx)]
    meta, _ = build_metadata(q_lens, ctx, pages, 4, torch.device("cpu"))
    backend = TorchPagedAttention()
    got = backend(q, k, v, backend.prepare(meta), 0.7, 6, window=window, softcap=softcap)
    want = paged_attention_reference(q, k, v, table, seq_lens, query_start, 0.7, window=window, softcap=softcap)
    assert torch.allclose(got, want, atol=1e-12)


@cuda
@pytest.mark.parametrize("window,softcap", OPTIONS + [(16, 50.0), (64, None)])
@pytest.mark.parametrize("q_lens", [[1] * 7, [1] * 300, [1, 37, 1, 130, 5]])
@pytest.mark.parametrize("listed", [False, True])
def test_triton_windows_and_softcaps_like_the_reference(window, softcap, q_lens, listed):
    """Decode (whole contexts and split ones: 7 sequences split each context, 300 do not) and
    mixed prefill steps, on GQA heads of Gemma 2's width."""
    from astrai.core.kernels.paged_attention_triton import paged_attention_triton, query_block_size

    if listed and len(q_lens) == 300:
        pytest.skip("the listed launch is for prefill steps")
    n_heads, n_kv_heads, dk = 8, 4, 128
    ctx = [q + (37 * b + 3) % 200 for b, q in enumerate(q_lens)]
    case = make_case(q_lens, ctx, n_heads, n_kv_heads, dk, dk, page_size=16, dtype=torch.bfloat16, device="cuda")
    blocks = None
    if listed:
        size = query_block_size(n_heads, n_kv_heads, dk)
        pairs = [(-1, 0)] + [(b, m) for b, n in enumerate(q_lens) for m in range(-(-n // size))] + [(-1, 0)] * 2
        blocks = tuple(torch.tensor(col, dtype=torch.int32, device="cuda") for col in zip(*pairs))
    got = paged_attention_triton(*case, scale=dk**-0.5, blocks=blocks, window=window, softcap=softcap).float()
    ref = paged_attention_reference(
        *[t.float() if t.is_floating_point() else t for t in case], scale=dk**-0.5, window=window, softcap=softcap
    )
    assert (got - ref).abs().max().item() < 2e-2


_INTERPRETED = textwrap.dedent("""
    import sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from test_paged_attention import make_case, needs_triton, run_interpreted
    from astrai.core.kernels.paged_attention import paged_attention_reference
    from astrai.core.kernels import paged_attention_triton as kernel
    from astrai.core.kernels.paged_attention_triton import paged_attention_triton

    for window, softcap in [(5, None), (None, 2.0), (7, 3.0), (20, None)]:
        opts = dict(window=window, softcap=softcap)
        # The decode kernel: whole contexts, and contexts split in 4 (some splits wholly before the window).
        for splits in (1, 4):
            ctx = [40, 1, 16, 0, 33]
            kernel.DECODE_PROGRAMS = len(ctx) * 2 * splits  # 2 KV heads
            case = make_case([1] * len(ctx), [max(c, 1) for c in ctx], 4, 2, 16, 16, 16, dtype=torch.float32)
            case[4][:] = torch.tensor(ctx)
            got = paged_attention_triton(*case, scale=0.25, max_q_len=1, **opts)
            err = (got - paged_attention_reference(*case, scale=0.25, **opts)).abs().max().item()
            assert err < 1e-4, ("decode", splits, window, softcap, err)
        # The general kernel: prefill chunks with and without history, pages of 4.
        q_lens, extra = [1, 9, 1, 37], [5, 0, 70, 2]
        case = make_case(q_lens, [q + e for q, e in zip(q_lens, extra)], 4, 2, 16, 16, 4, dtype=torch.float32)
        got = paged_attention_triton(*case, scale=0.25, **opts)
        err = (got - paged_attention_reference(*case, scale=0.25, **opts)).abs().max().item()
        assert err < 1e-4, ("prefill", window, softcap, err)
    print("kernel ok")
""")


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the compiled kernel is tested instead")
def test_triton_kernel_windows_and_softcaps_in_the_interpreter():
    proc = run_interpreted(_INTERPRETED)
    assert proc.returncode == 0 and "kernel ok" in proc.stdout, proc.stderr[-4000:]
