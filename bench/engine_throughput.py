"""Throughput and latency of the inference engine on a fixed random workload.

    uv run python bench/engine_throughput.py                                  # tiny model, CPU
    uv run python bench/engine_throughput.py --model configs/model/qwen3-0.6b.json \\
        --device cuda --dtype bfloat16 --num-requests 256 --prompt-len 256 256 --output-len 256 256

N requests with random prompt and output lengths (ignore_eos, so every request generates
exactly its output length) are streamed through one engine from an asyncio loop, the way
the server uses it. All arrive at once unless --rate is given (Poisson arrivals, requests/s).
Reports output tokens/s, time to first token and the gap between tokens of a request
(per-token latency) as percentiles. Weights are random: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from astrai.core.auto import AutoModel
from astrai.core.config import ModelConfig
from astrai.core.engine import InferenceEngine, SamplingParams


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="configs/model/tiny.json",
                   help="a ModelConfig JSON (random weights) or a model directory (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, nargs=2, default=[16, 128], metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=[16, 128], metavar=("MIN", "MAX"))
    p.add_argument("--rate", type=float, default=None, help="Poisson arrival rate in requests/s (default: all at once)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--kv-cache-memory", default=None, help="KV pool budget, e.g. 2GiB (default: engine's choice)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    return p.parse_args(argv)


def load_model(path: str, dtype: torch.dtype, device: str):
    p = Path(path)
    if p.is_dir():
        return AutoModel.from_pretrained(p, dtype=dtype, device=device)
    if not p.is_file():
        raise SystemExit(f"--model {path}: no such config file or model directory")
    return AutoModel.from_config(ModelConfig.from_json(p), dtype=dtype, device=device)


def workload(args, vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(args.seed)
    reqs = []
    for _ in range(args.num_requests):
        n_prompt, n_out = rng.randint(*args.prompt_len), rng.randint(*args.output_len)
        reqs.append(([rng.randrange(5, vocab) for _ in range(n_prompt)], n_out))
    return reqs


async def run(engine: InferenceEngine, reqs, args) -> tuple[float, list[float], list[float], int]:
    rng = random.Random(args.seed + 1)
    ttft, gaps, tokens = [], [], 0

    async def one(prompt, n_out, delay):
        nonlocal tokens
        await asyncio.sleep(delay)
        params = SamplingParams(max_tokens=n_out, temperature=args.temperature, ignore_eos=True)
        sent = last = time.perf_counter()
        first = True
        async for event in engine.astream(prompt, params):
            now = time.perf_counter()
            if event.token_ids:
                (ttft.append(now - sent) if first else gaps.append((now - last) / len(event.token_ids)))
                first, last = False, now
                tokens += len(event.token_ids)

    delays, t = [], 0.0
    for _ in reqs:
        delays.append(t)
        if args.rate:
            t += rng.expovariate(args.rate)
    start = time.perf_counter()
    await asyncio.gather(*(one(p, n, d) for (p, n), d in zip(reqs, delays)))
    return time.perf_counter() - start, ttft, gaps, tokens


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else [values[0]] * 99
    return {"mean": statistics.fmean(values), "p50": q[49], "p90": q[89], "p99": q[98]}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    torch.manual_seed(args.seed)
    model = load_model(args.model, dtype, args.device)
    engine = InferenceEngine(model, None, max_batch_size=args.max_batch_size,
                             max_num_batched_tokens=args.max_num_batched_tokens, page_size=args.page_size,
                             kv_cache_memory=args.kv_cache_memory, device=args.device)
    longest = args.prompt_len[1] + args.output_len[1]
    if longest > engine.max_model_len:
        raise SystemExit(f"prompt + output up to {longest} tokens exceeds max_model_len {engine.max_model_len}")
    reqs = workload(args, model.config.vocab_size)
    engine.generate([reqs[0][0]], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    engine.start()
    try:
        wall, ttft, gaps, tokens = asyncio.run(run(engine, reqs, args))
    finally:
        engine.shutdown()
    prompt_tokens = sum(len(p) for p, _ in reqs)
    figures = {
        "model": args.model, "device": str(engine.device), "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(), "requests": len(reqs), "prompt_tokens": prompt_tokens,
        "output_tokens": tokens, "wall_s": wall, "output_tok_s": tokens / wall,
        "total_tok_s": (tokens + prompt_tokens) / wall,
        "ttft_s": percentiles(ttft), "per_token_latency_s": percentiles(gaps),
        "engine": {k: v for k, v in engine.stats().items() if k in ("steps", "preemptions", "pages_total",
                                                                      "prefix_cache_hit_rate")},
    }
    print(f"model {args.model} on {figures['device']} ({figures['dtype']}, {figures['threads']} threads), "
          f"{model.num_parameters():,} parameters")
    print(f"{len(reqs)} requests, prompt {args.prompt_len[0]}-{args.prompt_len[1]}, "
          f"output {args.output_len[0]}-{args.output_len[1]} tokens, temperature {args.temperature}")
    print(f"output: {tokens} tokens in {wall:.2f} s = {tokens / wall:,.1f} tok/s "
          f"(prompt + output {figures['total_tok_s']:,.1f} tok/s)")
    for name, key in (("time to first token", "ttft_s"), ("per-token latency", "per_token_latency_s")):
        p = figures[key]
        print(f"{name}: mean {p['mean'] * 1e3:.1f} ms, p50 {p['p50'] * 1e3:.1f}, "
              f"p90 {p['p90'] * 1e3:.1f}, p99 {p['p99'] * 1e3:.1f} ms")
    print(f"engine: {figures['engine']}")
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
