"""Decode-step bandwidth of the Triton paged-attention kernel (CUDA only).

    python bench/paged_attention.py --batch 256 --context 384 --heads 16 --kv-heads 8 --head-dim 128
    python bench/paged_attention.py --kv-cache-dtype fp8         # float8 e4m3 pages, bf16 queries

Bytes counted: the keys and values of every sequence read once (2 bytes each, 1 with fp8).
Compare with the device's copy bandwidth (2.97 TB/s read+write on an H100).
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--context", type=int, default=384)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto", help="auto: bf16 pages")
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/paged_attention.py needs a CUDA device")
    import triton

    from astrai.core.kernels.paged_attention_triton import paged_attention_triton

    pages_per_seq = -(-a.context // a.page_size)
    n_pages = a.batch * pages_per_seq
    k = torch.randn(n_pages, a.page_size, a.kv_heads, a.head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    if a.kv_cache_dtype == "fp8":
        k, v = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
    table = torch.randperm(n_pages, device="cuda", dtype=torch.int32).view(a.batch, pages_per_seq)
    seq_lens = torch.full((a.batch,), a.context, device="cuda", dtype=torch.int32)
    query_start = torch.arange(a.batch + 1, device="cuda", dtype=torch.int32)
    q = torch.randn(a.batch, a.heads, a.head_dim, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(
        lambda: paged_attention_triton(q, k, v, table, seq_lens, query_start, a.head_dim**-0.5, None, 1), rep=200
    )
    bytes_read = a.batch * a.context * a.kv_heads * a.head_dim * 2 * k.element_size()
    print(
        f"{torch.cuda.get_device_name()}: batch {a.batch} context {a.context} heads {a.heads}/{a.kv_heads} "
        f"head_dim {a.head_dim} {k.dtype}: {ms * 1e3:.1f} us per layer, {bytes_read / ms / 1e9:.2f} TB/s"
    )


if __name__ == "__main__":
    main()
