"""Paged attention: the torch reference against dense float64 math, the Triton kernel against the reference
(on CUDA, and on the CPU through Triton's interpreter, so CI covers the kernel's indexing too)."""

import importlib.util
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from astrai.core.kernels.paged_attention import paged_attention_reference

FP8 = torch.float8_e4m3fn

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
HERE = Path(__file__).resolve().parent


def make_case(q_lens, ctx_lens, n_heads, n_kv_heads, dk, dv, page_size, mla=False, dtype=torch.float64, device="cpu"):
    """Random paged cache with shuffled page assignment, plus the dense per-sequence k/v it holds."""
    g = torch.Generator().manual_seed(0)
    pages_per_seq = [math.ceil(c / page_size) for c in ctx_lens]
    num_pages = sum(pages_per_seq) + 3
    perm = torch.randperm(num_pages, generator=g)
    k_cache = torch.randn(num_pages, page_size, n_kv_heads, dk, generator=g, dtype=torch.float64)
    v_cache = None if mla else torch.randn(num_pages, page_size, n_kv_heads, dv, generator=g, dtype=torch.float64)
    table = torch.zeros(len(q_lens), max(pages_per_seq), dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages_per_seq):
        table[b, :n] = perm[used : used + n]
        used += n
    q = torch.randn(sum(q_lens), n_heads, dk, generator=g, dtype=torch.float64)
    query_start = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    seq_lens = torch.tensor(ctx_lens, dtype=torch.int32)
    to = lambda t: None if t is None else t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    return to(q), to(k_cache), to(v_cache), to(table), to(seq_lens), to(query_start)


def dense_expected(q, k_cache, v_cache, table, seq_lens, query_start, scale, dv):
    """Softmax attention written out per query in float64."""
    page_size, n_heads, n_kv = k_cache.shape[1], q.shape[1], k_cache.shape[2]
    out = torch.zeros(q.shape[0], n_heads, dv, dtype=torch.float64)
    for b in range(len(seq_lens)):
        ctx, lo, hi = int(seq_lens[b]), int(query_start[b]), int(query_start[b + 1])
        for i, t in enumerate(range(lo, hi)):
            pos = ctx - (hi - lo) + i
            for h in range(n_heads):
                kvh = h // (n_heads // n_kv)
                keys = torch.stack(
                    [k_cache[table[b, j // page_size], j % page_size, kvh] for j in range(pos + 1)]
                ).double()
                vals = (
                    keys[:, :dv]
                    if v_cache is None
                    else torch.stack(
                        [v_cache[table[b, j // page_size], j % page_size, kvh] for j in range(pos + 1)]
                    ).double()
                )
                w = torch.softmax(keys @ q[t, h].double() * scale, 0)
                out[t, h] = w @ vals
    return out


@pytest.mark.parametrize("mla", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
def test_reference_matches_dense_math(mla, fp8):
    case = make_case(
        [1, 5, 3], [9, 5, 20], n_heads=4, n_kv_heads=1 if mla else 2, dk=12, dv=8 if mla else 6, page_size=4, mla=mla
    )
    dv = 8 if mla else 6
    if fp8:  # float8 pools (kv_cache_dtype="fp8"): read back in the queries' dtype
        case = (case[0], *[None if t is None else t.to(FP8) for t in case[1:3]], *case[3:])
    got = paged_attention_reference(*case, scale=0.3, v_dim=dv)
    if fp8:
        case = (case[0], *[None if t is None else t.double() for t in case[1:3]], *case[3:])
    assert torch.allclose(got, dense_expected(*case, scale=0.3, dv=dv), atol=1e-12)


@cuda
@pytest.mark.parametrize(
    "n_heads,n_kv_heads,dk,dv,mla",
    [
        (16, 8, 128, 128, False),
        (14, 2, 64, 64, False),
        (8, 8, 64, 64, False),
        (4, 2, 8, 8, False),
        (16, 1, 576, 512, True),
    ],
)
@pytest.mark.parametrize("q_lens", [[1] * 7, [1, 37, 1, 130, 5]])
@pytest.mark.parametrize("listed", [False, True])
def test_triton_matches_reference(n_heads, n_kv_heads, dk, dv, mla, q_lens, listed):
    from astrai.core.kernels.paged_attention_triton import paged_attention_triton, query_block_size

    ctx = [q + extra for q, extra in zip(q_lens, [3, 0, 200, 17, 64, 1, 90])]
    case = make_case(
        q_lens, ctx, n_heads, n_kv_heads, dk, dv, page_size=16, mla=mla, dtype=torch.bfloat16, device="cuda"
    )
    scale = dk**-0.5
    blocks = None
    if listed:  # one program per (sequence, query block), unused entries -1 (CUDA-graph prefill)
        size = query_block_size(n_heads, n_kv_heads, dk)
        pairs = [(-1, 0)] + [(b, m) for b, n in enumerate(q_lens) for m in range(-(-n // size))] + [(-1, 0)] * 2
        blocks = tuple(torch.tensor(col, dtype=torch.int32, device="cuda") for col in zip(*pairs))
    got = paged_attention_triton(*case, scale=scale, v_dim=dv, blocks=blocks).float()
    ref = paged_attention_reference(
        *[None if t is None else (t.float() if t.is_floating_point() else t) for t in case], scale=scale, v_dim=dv
    )
    assert (got - ref).abs().max().item() < 2e-2


@cuda
@pytest.mark.parametrize("n_heads,n_kv_heads,dk,dv,mla", [(16, 8, 128, 128, False), (16, 1, 576, 512, True)])
@pytest.mark.parametrize("q_lens", [[1] * 7, [1, 37, 1, 130, 5]])
def test_triton_reads_fp8_pools(n_heads, n_kv_heads, dk, dv, mla, q_lens):
    """kv_cache_dtype="fp8": bf16 queries over float8 pages, against the reference on the same
    pages read exactly in float32."""
    from astrai.core.kernels.paged_attention_triton import paged_attention_triton

    ctx = [q + extra for q, extra in zip(q_lens, [3, 0, 200, 17, 64, 1, 90])]
    q, k, v, *rest = make_case(
        q_lens, ctx, n_heads, n_kv_heads, dk, dv, page_size=16, mla=mla, dtype=torch.bfloat16, device="cuda"
    )
    k, v = k.to(FP8), None if v is None else v.to(FP8)
    got = paged_attention_triton(q, k, v, *rest, scale=dk**-0.5, v_dim=dv).float()
    ref = paged_attention_reference(
        q.float(), k.float(), None if v is None else v.float(), *rest, scale=dk**-0.5, v_dim=dv
    )
    assert (got - ref).abs().max().item() < 2e-2


@cuda
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("batch", [7, 160, 300])  # at 16 / 8 heads: contexts split in 32, 2, 1
@pytest.mark.parametrize("page_size", [8, 16, 32])  # 8: the general kernel; 16, 32: the decode kernel
@pytest.mark.parametrize("n_heads,n_kv_heads,dk", [(16, 8, 128), (14, 2, 64), (32, 1, 64), (8, 8, 80), (4, 2, 8)])
def test_triton_decode(fp8, batch, page_size, n_heads, n_kv_heads, dk):
    """Decode steps (one query per sequence) against the reference: groups of 1 to 32 heads
    (more than tl.dot's 16 rows at 32), a head narrower than its tile (80) or than tl.dot's
    smallest (8, a tiny model's), pages of one or
    several key tiles, contexts that end mid-tile and mid-page, and a padding row (context 0:
    zeros, as CUDA-graph decode pads its batches)."""
    from astrai.core.kernels.paged_attention_triton import paged_attention_triton

    ctx = [1 + (37 * b) % 300 for b in range(batch)]
    q, k, v, table, seq_lens, query_start = make_case(
        [1] * batch, ctx, n_heads, n_kv_heads, dk, dk, page_size, dtype=torch.bfloat16, device="cuda"
    )
    seq_lens[3] = 0
    if fp8:
        k, v = k.to(FP8), v.to(FP8)
    got = paged_attention_triton(q, k, v, table, seq_lens, query_start, scale=dk**-0.5, max_q_len=1).float()
    ref = paged_attention_reference(q.float(), k.float(), v.float(), table, seq_lens, query_start, scale=dk**-0.5)
    assert got[3].abs().max() == 0
    assert (got - ref).abs().max().item() < 2e-2


@cuda
def test_triton_fp8_pool_clamps_queries_beyond_float16():
    """Under an fp8 pool bf16 queries are read as float16: one past float16's range (65,504) must
    not turn the scores into inf and the output into NaN; its softmax is then one-hot in both."""
    from astrai.core.kernels.paged_attention_triton import paged_attention_triton

    q, k, v, *rest = make_case([1, 1], [20, 33], 4, 2, 64, 64, page_size=16, dtype=torch.bfloat16, device="cuda")
    q[0, 1] = 0.0
    q[0, 1, 0] = 1e6  # bf16 holds it; float16 would be inf. One channel: the clamp keeps the key order
    k, v = k.to(FP8), v.to(FP8)
    got = paged_attention_triton(q, k, v, *rest, scale=64**-0.5, max_q_len=1).float()
    ref = paged_attention_reference(q.float(), k.float(), v.float(), *rest, scale=64**-0.5)
    assert torch.isfinite(got).all()
    assert (got - ref).abs().max().item() < 2e-2


_INTERPRETED = textwrap.dedent("""
    import sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from test_paged_attention import make_case
    from astrai.core.kernels.paged_attention import paged_attention_reference
    from astrai.core.kernels import paged_attention_triton as kernel
    from astrai.core.kernels.paged_attention_triton import paged_attention_triton, query_block_size

    cases = [  # (q_lens, extra context, heads, kv heads, dk, dv, mla)
        ([1, 1, 1], [3, 0, 21], 4, 2, 16, 16, False),  # decode, GQA
        ([1, 9, 1, 37], [5, 0, 70, 2], 4, 2, 16, 16, False),  # mixed: prefill chunks with and without history
        ([6, 1], [11, 30], 4, 1, 24, 16, True),  # MLA: values are the keys' first channels
    ]
    # The decode kernel (pages of 16 and 32; context 0 is a padding row), whole contexts per
    # program and split in 2 and 32 (its target of programs moved to get each).
    for splits in (1, 2, 32):
        for page_size, ctx in [(16, [40, 1, 16, 0, 33]), (32, [70, 5, 0])]:
            kernel.DECODE_PROGRAMS = len(ctx) * 2 * splits  # 2 KV heads
            assert kernel.decode_splits(len(ctx), 2) == splits
            for dk, dv, mla in [(16, 16, False), (24, 16, True)]:  # MLA: values are the keys' first channels
                case = make_case([1] * len(ctx), [max(c, 1) for c in ctx], 4, 2, dk, dv, page_size, mla=mla,
                                 dtype=torch.float32)
                case[4][:] = torch.tensor(ctx)
                got = paged_attention_triton(*case, scale=0.25, v_dim=dv, max_q_len=1)
                err = (got - paged_attention_reference(*case, scale=0.25, v_dim=dv)).abs().max().item()
                assert err < 1e-4, ("decode", splits, page_size, mla, err)
    for q_lens, extra, h, kv, dk, dv, mla in cases:
        ctx = [q + e for q, e in zip(q_lens, extra)]
        case = make_case(q_lens, ctx, h, kv, dk, dv, page_size=4, mla=mla, dtype=torch.float32)
        got = paged_attention_triton(*case, scale=dk**-0.5, v_dim=dv)
        want = paged_attention_reference(*case, scale=dk**-0.5, v_dim=dv)
        err = (got - want).abs().max().item()
        assert err < 1e-4, (q_lens, mla, err)
        # The listed launch (CUDA-graph prefill): one program per (sequence, query block) from
        # a list with unused entries; rows past the last sequence's queries are padding.
        size = query_block_size(h, kv, dk)
        pairs = [(b, m) for b, n in enumerate(q_lens) for m in range(-(-n // size))]
        pairs = [(-1, 0)] * 2 + pairs[:1] + [(-1, 0)] + pairs[1:] + [(-1, 0)] * 3
        blocks = tuple(torch.tensor(col, dtype=torch.int32) for col in zip(*pairs))
        q = torch.cat([case[0], torch.randn(5, *case[0].shape[1:])])
        got = paged_attention_triton(q, *case[1:], scale=dk**-0.5, v_dim=dv, blocks=blocks)
        err = (got[: case[0].shape[0]] - want).abs().max().item()
        assert err < 1e-4, ("listed", q_lens, mla, err)
    print("kernel ok")
""")


# The interpreter stands in for the GPU on CPU machines; on CUDA the compiled kernel is tested.
# (The GPU image's Triton 3.6 interpreter with numpy 2.5 cannot run a loop whose bound is loaded.)
@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the compiled kernel is tested instead")
def test_triton_kernel_matches_reference_in_the_interpreter():
    proc = run_interpreted(_INTERPRETED)
    assert proc.returncode == 0 and "kernel ok" in proc.stdout, proc.stderr[-4000:]


def check_kernel_interpreted(module: str) -> None:
    """Run test module `module`'s check_kernel('cpu') in the Triton interpreter (run_interpreted)."""
    script = f"import sys; sys.path.insert(0, sys.argv[1])\nfrom {module} import check_kernel\n"
    proc = run_interpreted(script + "check_kernel('cpu'); print('kernel ok')")
    assert proc.returncode == 0 and "kernel ok" in proc.stdout, proc.stderr[-4000:]


def run_interpreted(script: str) -> subprocess.CompletedProcess:
    """`script` (given this folder as argv[1]) in a fresh Python under TRITON_INTERPRET=1: the
    variable must be set before triton is imported, hence the subprocess."""
    return subprocess.run(
        [sys.executable, "-c", script, str(HERE)],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        cwd=HERE.parents[1],
        capture_output=True,
        text=True,
        timeout=600,
    )
