"""Fused inference kernels (RMSNorm, q/k RoPE, SiLU*mul) against the torch ops they replace.

On CPU the kernels run in Triton's interpreter (a subprocess with TRITON_INTERPRET=1, set before
triton is imported). The interpreter rounds float32 -> bf16 towards zero where the GPU rounds to
nearest, and the kernels round up to three times in a row (as torch does), so bf16 results may
differ by a few bf16 steps there (2^-6 relative); on the GPU by one at most. Float32 must agree
closely. Wrong halves, signs, weights or heads give errors of order one.
On CUDA the same comparisons run on the real kernels, plus the dispatch rule.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from astrai.core.kernels.dispatch import fused_kernels, use_fused

REPO = Path(__file__).resolve().parents[2]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")

# Shared by the interpreter subprocess and the CUDA tests: `check(device, bf16_rtol)`.
_CHECKS = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from astrai.core.kernels import fused_norm, fused_rope, fused_silu_mul, store_kv
    from astrai.core.norm import RMSNorm
    from astrai.core.rope import apply_rope

    def close(got, want, dtype, bf16_rtol):
        assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype, got.shape, want.shape)
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
        else:
            # RoPE sums two rounded products, which can cancel: allow the error of the larger terms
            scale = float(want.float().abs().max())
            torch.testing.assert_close(got.float(), want.float(), rtol=bf16_rtol, atol=bf16_rtol * scale)

    def norm_module(n, dtype, device, g):
        m = RMSNorm(n, eps=1e-5)
        with torch.no_grad():
            m.weight.copy_(1 + 0.5 * torch.randn(n, generator=g))
        return m.to(device=device, dtype=dtype)

    def check_norm(device, dtype, bf16_rtol, g):
        for n in (64, 100):  # a power of two and an odd row size (masked lanes)
            m = norm_module(n, dtype, device, g)
            x = (3 * torch.randn(3, 5, n, generator=g)).to(device=device, dtype=dtype)
            x[0, 0] *= 1e-3  # variance near eps: a wrong eps shows here
            with torch.no_grad():
                close(fused_norm.rms_norm(x, m.weight, m.eps), m._torch_forward(x), dtype, bf16_rtol)
                # a strided row view (MLA's latent is a split of a wider projection)
                wide = torch.randn(4, 7, n + 9, generator=g).to(device=device, dtype=dtype)
                part = wide[..., :n]
                close(fused_norm.rms_norm(part, m.weight, m.eps), m._torch_forward(part), dtype, bf16_rtol)
                r = torch.randn(3, 5, n, generator=g).to(device=device, dtype=dtype)
                summed, normed = fused_norm.rms_norm(x, m.weight, m.eps, residual=r)
                close(summed, x + r, dtype, bf16_rtol)
                close(normed, m._torch_forward(summed), dtype, bf16_rtol)  # the norm of the sum it returned

    def check_rope(device, dtype, bf16_rtol, g):
        for d, hq, hk, t, with_norm in ((16, 4, 2, 5, False), (12, 3, 1, 4, True), (16, 5, 5, 1, True)):
            b = 2
            q = torch.randn(b, t, hq, d, generator=g).to(device=device, dtype=dtype)
            k = torch.randn(b, t, hk, d, generator=g).to(device=device, dtype=dtype)
            angle = torch.rand(b, t, d // 2, generator=g) * 50
            cos = torch.cat([angle.cos()] * 2, -1).to(device=device, dtype=dtype)
            sin = torch.cat([angle.sin()] * 2, -1).to(device=device, dtype=dtype)
            norms = (norm_module(d, dtype, device, g), norm_module(d, dtype, device, g)) if with_norm else None
            with torch.no_grad():
                weights = None if norms is None else (norms[0].weight, norms[1].weight)
                assert fused_rope.supports(q, k, cos, weights)
                got_q, got_k = fused_rope.qk_rope(q, k, cos, sin, weights, 1e-5)
                if norms is not None:
                    q, k = norms[0]._torch_forward(q), norms[1]._torch_forward(k)
                close(got_q, apply_rope(q, cos, sin), dtype, bf16_rtol)
                close(got_k, apply_rope(k, cos, sin), dtype, bf16_rtol)
        # MLA: q's rotary part is a strided split, k has one head, cos is shared by the batch
        b, t, h, nope, r = 3, 4, 2, 8, 6
        q = torch.randn(b, t, h, nope + r, generator=g).to(device=device, dtype=dtype)[..., nope:]
        k = torch.randn(b, t, 10 + r, generator=g).to(device=device, dtype=dtype)[..., 10:].view(b, t, 1, r)
        cos = torch.randn(1, t, r, generator=g).to(device=device, dtype=dtype)
        sin = torch.randn(1, t, r, generator=g).to(device=device, dtype=dtype)
        with torch.no_grad():
            got_q, got_k = fused_rope.qk_rope(q, k, cos, sin)
            close(got_q, apply_rope(q, cos, sin), dtype, bf16_rtol)
            close(got_k, apply_rope(k, cos, sin), dtype, bf16_rtol)

    def check_silu_mul(device, dtype, bf16_rtol, g):
        for shape in ((3, 7), (2, 3, 1500)):  # a partial block and several blocks
            gate = (4 * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype)
            up = torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
            close(fused_silu_mul.silu_mul(gate, up), F.silu(gate) * up, dtype, bf16_rtol)
            # the two halves of one packed gate/up GEMM output: rows with a stride of 2 * width
            packed = (4 * torch.randn(*shape[:-1], 2 * shape[-1], generator=g)).to(device=device, dtype=dtype)
            gate, up = packed.split(shape[-1], dim=-1)
            assert fused_silu_mul.supports(gate, up)
            close(fused_silu_mul.silu_mul(gate, up), F.silu(gate) * up, dtype, bf16_rtol)

    def check_store_kv(device, dtype, g):
        pages, page_size, heads, dim = 5, 4, 3, 20  # dim not a power of two: masked channels
        slots = torch.randperm(pages * page_size, generator=g)[:7].to(device)
        for with_v in (True, False):  # False: MLA stores only the latent
            k_pool = torch.zeros(pages, page_size, heads, dim, device=device, dtype=dtype)
            v_pool = torch.zeros_like(k_pool) if with_v else None
            qkv = torch.randn(7, 3 * heads * dim, generator=g).to(device=device, dtype=dtype)  # packed GEMM output
            k = qkv[:, heads * dim : 2 * heads * dim].contiguous().view(7, heads, dim)
            v = qkv[:, 2 * heads * dim :].view(7, heads, dim) if with_v else None  # strided rows
            assert store_kv.supports(k, v, k_pool, v_pool)
            store_kv.store_kv(k, v, k_pool, v_pool, slots)
            want_k = torch.zeros_like(k_pool).flatten(0, 1).index_copy_(0, slots, k)
            assert torch.equal(k_pool.flatten(0, 1), want_k)
            if with_v:
                assert torch.equal(v_pool.flatten(0, 1), torch.zeros_like(want_k).index_copy_(0, slots, v))
        if device == "cuda":  # float8 pools (kv_cache_dtype="fp8"); the interpreter has no fp8 type
            k = torch.randn(7, heads, dim, generator=g).to(device=device, dtype=dtype) * 200  # some beyond +-448
            pool = torch.zeros(pages, page_size, heads, dim, device=device, dtype=torch.float8_e4m3fn)
            store_kv.store_kv(k, None, pool, None, slots)
            want = k.float().clamp(-448, 448).to(torch.float8_e4m3fn)  # round to nearest even, saturated
            got = pool.flatten(0, 1).view(torch.uint8)[slots]
            assert torch.equal(got, want.view(torch.uint8)) and pool.float().abs().max() == 448

    def check(device, bf16_rtol):
        g = torch.Generator().manual_seed(0)
        for dtype in (torch.float32, torch.bfloat16):
            check_norm(device, dtype, bf16_rtol, g)
            check_rope(device, dtype, bf16_rtol, g)
            check_silu_mul(device, dtype, bf16_rtol, g)
            check_store_kv(device, dtype, g)
""")


@needs_triton
def test_kernels_match_the_torch_ops_in_the_interpreter():
    script = _CHECKS + "\ncheck('cpu', 2**-6)\nprint('kernels ok')\n"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and "kernels ok" in proc.stdout, proc.stderr[-4000:]


@cuda
def test_kernels_match_the_torch_ops_on_cuda():
    namespace: dict = {}
    exec(_CHECKS, namespace)
    namespace["check"]("cuda", 2**-7)  # round-to-nearest on both sides


def test_fused_path_is_only_for_cuda_inference():
    x = torch.zeros(2)
    with torch.no_grad():
        assert not use_fused(x)  # CPU
    if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
        y = x.cuda()
        assert not use_fused(y)  # gradients enabled: training keeps the torch ops
        with torch.inference_mode():
            assert use_fused(y)
            with fused_kernels(False):
                assert not use_fused(y)


def test_bad_switch_value_names_the_variable():
    env = {**os.environ, "ASTRAI_FUSED_KERNELS": "yes"}
    proc = subprocess.run(
        [sys.executable, "-c", "import astrai.core.kernels.dispatch"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "ASTRAI_FUSED_KERNELS must be 0" in proc.stderr, proc.stderr[-2000:]


@needs_triton
def test_unsupported_inputs_keep_the_torch_path():
    from astrai.core.kernels import fused_norm, fused_rope, fused_silu_mul

    x, w = torch.randn(2, 3, 8), torch.ones(8)
    assert fused_norm.supports(x, w)
    assert not fused_norm.supports(x.double(), w.double())  # the kernel computes in float32
    assert not fused_norm.supports(x, torch.ones(6))
    assert not fused_norm.supports(x, w, residual=x.bfloat16())
    q, k, cos = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 2, 8), torch.randn(1, 3, 8)
    assert fused_rope.supports(q, k, cos)
    assert not fused_rope.supports(q.double(), k.double(), cos.double())
    assert not fused_rope.supports(q, k, cos.bfloat16())
    assert not fused_rope.supports(q, k, cos, (torch.ones(8), torch.ones(6)))
    assert not fused_rope.supports(q[..., :7], k[..., :7], cos[..., :7])  # odd rotary width
    assert fused_silu_mul.supports(x, x)
    assert not fused_silu_mul.supports(x, x.transpose(0, 1).contiguous().transpose(0, 1))  # strided
    assert not fused_silu_mul.supports(x[..., ::2], x[..., ::2])  # no unit last stride
