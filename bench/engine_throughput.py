"""Throughput and latency of the inference engine on a fixed random workload.

    uv run python bench/engine_throughput.py                                  # tiny model, CPU
    python3 bench/engine_throughput.py --model configs/model/qwen3-0.6b.json --device cuda \\
        --workload decode256 --temperature 0 --api generate --reference      # issue 7, batch 256
    python3 bench/engine_throughput.py --model configs/model/qwen3-0.6b.json --device cuda \\
        --workload mixed --temperature 0                                      # issue 7, mixed

N requests with random prompt and output lengths (ignore_eos, so every request generates
exactly its output length) go through one engine. With --api astream (default) they are
streamed from an asyncio loop, the way the server uses the engine, and time to first token and
the gap between a request's tokens are reported as percentiles; with --api generate they are
one offline `generate` call (throughput only). All arrive at once unless --rate is given.

Workload presets (bench/workloads.py, shared with bench/serve_load.py, which sends the same
requests through astrai-serve; explicit flags still win). Every preset sets max batch 256 and
--max-num-batched-tokens 8192:
  decode256  256 requests, prompt 256, output 256 (transformers on H100: see shared/README and
             bench/RESULTS.md; generate is launch-bound, so its figure follows the machine's CPU)
  mixed      256 requests, prompt and output lengths uniform in 100-1024
  short      512 requests, prompts uniform in 16-128, outputs uniform in 64-128

--reference also runs transformers `generate` (the same config as Llama/Qwen2/Qwen3 with random
weights, the same dtype, SDPA, greedy, the same prompts and lengths, batches of --max-batch-size)
in the same process, called two ways (with an attention mask and min_new_tokens, and bare),
and prints both figures and the ratio to the faster one; it needs fixed lengths.
Both run under the same process settings: on CUDA one torch CPU thread (what the engine sets
for itself, engine/host_settings.py) and a frozen garbage collector after set-up (what astrai-serve does).

The decode bandwidth floor: a decode step must read every weight once and every cached key and
value of its sequences, so at --bandwidth bytes/s (default: H100 device copy 2.97 TB/s) it takes
at least (weight bytes + sum of context lengths x KV bytes per token) / bandwidth. The engine
times its pure decode steps (all sequences decoding, wall time of the whole step); the report
compares the largest decode batch's mean step with its floor. Weights are random: speed does
not depend on them.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from workloads import WORKLOADS, arrival_delays, draw  # bench/ is on sys.path when a script of it runs

from astrai.core.auto import AutoModel
from astrai.core.config import ModelConfig
from astrai.core.engine import InferenceEngine, SamplingParams
from astrai.core.engine.host_settings import limit_cpu_threads, quiet_gc

H100_COPY_BANDWIDTH = 2.97e12


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--workload",
        choices=sorted(WORKLOADS),
        default=None,
        help="a preset for the lengths, request count, max batch size and token budget (see above)",
    )
    p.add_argument(
        "--model",
        default="configs/model/tiny.json",
        help="a ModelConfig JSON (random weights) or a model directory (default: %(default)s)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument(
        "--dtype", default=None, help="float32, bfloat16, float16 (default: float32 on CPU, bfloat16 on CUDA)"
    )
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, nargs=2, default=[16, 128], metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=[16, 128], metavar=("MIN", "MAX"))
    p.add_argument("--rate", type=float, default=None, help="Poisson arrival rate in requests/s (default: all at once)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (what --reference runs)")
    p.add_argument(
        "--api",
        choices=("astream", "generate"),
        default="astream",
        help="stream every request from an asyncio loop (latencies) or one generate call",
    )
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="most tokens in one engine step (default: %(default)s; the presets: 8192)",
    )
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--kv-cache-memory", default=None, help="KV pool budget, e.g. 2GiB (default: engine's choice)")
    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=("auto", "fp8"),
        help="KV cache storage: the model's dtype, or float8 e4m3 (half the bytes of bf16; the "
        "decode floor then counts one byte per cached value)",
    )
    p.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decode steps as CUDA graphs (default: the engine's choice, on for CUDA)",
    )
    p.add_argument(
        "--prefill-graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="prefill and mixed steps as CUDA graphs too (default: the engine's choice, on with the decode graphs)",
    )
    p.add_argument(
        "--overlap",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="launch each CUDA-graph decode step before reading the previous step's tokens "
        "(default: on, as the engine does)",
    )
    p.add_argument("--reference", action="store_true", help="also time transformers generate on the same workload")
    p.add_argument(
        "--bandwidth",
        type=float,
        default=H100_COPY_BANDWIDTH,
        help="memory bandwidth in bytes/s for the decode floor (default: %(default).3g)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's on CPU, 1 on CUDA as the engine sets it)",
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="prompt ids are drawn below this (default: the model's vocab_size); bench/serve_load.py "
        "passes the tokenizer's, the ids the server accepts, so both send the same prompts",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    preset = p.parse_known_args(argv)[0].workload
    if preset:
        p.set_defaults(**WORKLOADS[preset])
    args = p.parse_args(argv)
    if args.reference and (args.prompt_len[0] != args.prompt_len[1] or args.output_len[0] != args.output_len[1]):
        p.error("--reference needs fixed lengths (--prompt-len N N --output-len M M, or --workload decode256)")
    return args


def load_model(path: str, dtype: torch.dtype, device: str):
    p = Path(path)
    if p.is_dir():
        return AutoModel.from_pretrained(p, dtype=dtype, device=device)
    if not p.is_file():
        raise SystemExit(f"--model {path}: no such config file or model directory")
    return AutoModel.from_config(ModelConfig.from_json(p), dtype=dtype, device=device)


def workload(args, model_vocab: int) -> list[tuple[list[int], int]]:
    vocab = args.vocab_size or model_vocab
    if vocab > model_vocab:
        raise SystemExit(f"--vocab-size {vocab} exceeds the model's vocab_size {model_vocab}")
    return draw(args.num_requests, args.prompt_len, args.output_len, vocab, args.seed)


def _params(args, n_out: int) -> SamplingParams:
    return SamplingParams(max_tokens=n_out, temperature=args.temperature, ignore_eos=True)


async def run_stream(engine: InferenceEngine, reqs, args) -> tuple[float, list[float], list[float], int]:
    ttft, gaps, tokens = [], [], 0

    async def one(prompt, n_out, delay):
        nonlocal tokens
        await asyncio.sleep(delay)
        sent = last = time.perf_counter()
        first = True
        async for event in engine.astream(prompt, _params(args, n_out)):
            now = time.perf_counter()
            if event.token_ids:
                (ttft.append(now - sent) if first else gaps.append((now - last) / len(event.token_ids)))
                first, last = False, now
                tokens += len(event.token_ids)

    delays = arrival_delays(len(reqs), args.rate, args.seed)
    start = time.perf_counter()
    await asyncio.gather(*(one(p, n, d) for (p, n), d in zip(reqs, delays)))
    return time.perf_counter() - start, ttft, gaps, tokens


def warm_up(engine: InferenceEngine, args) -> None:
    """Run the workload's shape once on other prompts (no shared prefix page), untimed: kernels
    are compiled for every step size it meets and memory pools have grown, so the timed run is
    the steady state."""
    warm = argparse.Namespace(**{**vars(args), "seed": args.seed + 2})
    reqs = workload(warm, engine.model.config.vocab_size)
    engine.generate([p for p, _ in reqs], [_params(args, n) for _, n in reqs])
    engine.scheduler.reset_prefix_cache()


def run_generate(engine: InferenceEngine, reqs, args) -> tuple[float, int]:
    start = time.perf_counter()
    completions = engine.generate([p for p, _ in reqs], [_params(args, n) for _, n in reqs])
    return time.perf_counter() - start, sum(c.completion_tokens for c in completions)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else [values[0]] * 99
    return {"mean": statistics.fmean(values), "p50": q[49], "p90": q[89], "p99": q[98]}


# -- the transformers reference ---------------------------------------------------------------
def reference_tok_s(config: ModelConfig, reqs, args, dtype: torch.dtype) -> float:
    """Output tokens/s of transformers generate (greedy, SDPA, random weights) on the same prompts."""
    import transformers

    from astrai.core.hf_config import to_hf_dict

    fields = to_hf_dict(config)
    model_type = fields.pop("model_type")
    if model_type == "astrai":
        raise SystemExit("--reference needs a config transformers can run (Llama, Qwen2 or Qwen3 shape)")
    for key in ("architectures", "astrai"):
        fields.pop(key, None)
    hf_config = transformers.AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation="sdpa")
    model.to(args.device).eval()
    n_out = args.output_len[0]
    batches = [reqs[i : i + args.max_batch_size] for i in range(0, len(reqs), args.max_batch_size)]

    def generate(batch, new_tokens: int, explicit: bool) -> None:
        ids = torch.tensor([p for p, _ in batch], device=args.device)
        # explicit: an attention mask and min_new_tokens, as a careful caller writes it; else the
        # bare call (no EOS, so it runs to max_new_tokens either way). Whichever is faster counts.
        extra = dict(attention_mask=torch.ones_like(ids), min_new_tokens=new_tokens) if explicit else {}
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0, **extra)

    generate(batches[0], 4, True)  # warm-up: kernels, cuBLAS handles
    generate(batches[0], 4, False)
    best = 0.0
    for explicit in (True, False):
        _sync(args.device)
        start = time.perf_counter()
        for batch in batches:
            generate(batch, n_out, explicit)
        _sync(args.device)
        tok_s = len(reqs) * n_out / (time.perf_counter() - start)
        print(
            f"transformers generate ({'attention_mask + min_new_tokens' if explicit else 'bare call'}): "
            f"{tok_s:,.1f} tok/s",
            flush=True,
        )
        best = max(best, tok_s)
    model = None  # free the weights before the engine takes the memory (generate is not called again)
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# -- the decode bandwidth floor ---------------------------------------------------------------
def weight_bytes_read(model) -> int:
    """Bytes of weights a decode step reads: every parameter once (tied ones once), except an
    untied input embedding, of which only the batch's rows are read."""
    unique = {p.data_ptr(): p for p in model.parameters()}
    total = sum(p.numel() * p.element_size() for p in unique.values())
    embed = model.model.embed_tokens.weight
    if embed.data_ptr() != model.lm_head.weight.data_ptr():
        total -= embed.numel() * embed.element_size()
    return total


def decode_floor(engine: InferenceEngine, model, bandwidth: float) -> dict | None:
    """Mean pure-decode step against its bandwidth floor, for the largest decode batch seen
    (at least 3 steps) and over every decode step."""
    by_batch = engine.core.decode_timing.by_batch
    kv_per_token = model.kv_layout().bytes_per_token(engine.cache.k.element_size())  # fp8 cache: 1 byte
    weights = weight_bytes_read(model)
    floors = {b: (steps * weights + ctx * kv_per_token) / bandwidth for b, (steps, _, ctx) in by_batch.items()}
    big = [b for b, (steps, _, _) in by_batch.items() if steps >= 3]
    if not big:
        return None
    batch = max(big)
    steps, seconds, ctx = by_batch[batch]
    runner = engine.core.decode_runner
    replays = (
        [start.elapsed_time(end) for b, start, end in (runner.replay_events or []) if b == batch]
        if runner is not None
        else []
    )
    return {
        "graph_replay_ms": statistics.fmean(replays) if replays else None,
        "batch": batch,
        "steps": steps,
        "step_ms": seconds / steps * 1e3,
        "context_tokens_per_step": ctx / steps,
        "weight_gb": weights / 1e9,
        "kv_gb_per_step": ctx / steps * kv_per_token / 1e9,
        "floor_ms": floors[batch] / steps * 1e3,
        "fraction_of_floor": floors[batch] / seconds,
        "decode_tok_s": batch * steps / seconds,
        "bandwidth_tb_s": bandwidth / 1e12,
        "all_decode_steps": sum(s for s, _, _ in by_batch.values()),
        "all_decode_fraction_of_floor": sum(floors.values()) / sum(s for _, s, _ in by_batch.values()),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    on_cuda = args.device.startswith("cuda")
    # The process settings a CUDA engine makes for itself (engine/host_settings.py), made first so the
    # transformers reference runs under them too; --threads overrides.
    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        limit_cpu_threads(torch.device(args.device))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if on_cuda else torch.float32)
    config = ModelConfig.from_json(args.model) if Path(args.model).is_file() else None
    reqs = None
    reference = None
    if args.reference:
        if config is None:
            raise SystemExit("--reference needs --model to be a ModelConfig JSON")
        reqs = workload(args, config.vocab_size)
        quiet_gc()
        reference = reference_tok_s(config, reqs, args, dtype)  # first: the engine then takes the free memory
    torch.manual_seed(args.seed)
    model = load_model(args.model, dtype, args.device)
    engine = InferenceEngine(
        model,
        None,
        max_batch_size=args.max_batch_size,
        max_num_batched_tokens=max(args.max_num_batched_tokens, args.max_batch_size),
        page_size=args.page_size,
        kv_cache_memory=args.kv_cache_memory,
        kv_cache_dtype=args.kv_cache_dtype,
        device=args.device,
        cuda_graphs=args.cuda_graphs,
        prefill_graphs=args.prefill_graphs,
    )
    longest = args.prompt_len[1] + args.output_len[1]
    if longest > engine.max_model_len:
        raise SystemExit(f"prompt + output up to {longest} tokens exceeds max_model_len {engine.max_model_len}")
    engine.core.overlap = args.overlap
    reqs = reqs or workload(args, model.config.vocab_size)
    warm_up(engine, args)
    quiet_gc()  # as astrai-serve does after start-up: no full collection walks the model mid-run
    engine.core.reset_stats()
    if engine.core.decode_runner is not None and engine.core.decode_runner.graphs:
        engine.core.decode_runner.replay_events = []  # device time of each graph replay
    ttft = gaps = []
    if args.api == "generate":
        wall, tokens = run_generate(engine, reqs, args)
    else:
        engine.start()
        try:
            wall, ttft, gaps, tokens = asyncio.run(run_stream(engine, reqs, args))
        finally:
            engine.shutdown()
    report(args, engine, model, dtype, reqs, wall, tokens, ttft, gaps, reference)
    return 0


def report(args, engine, model, dtype, reqs, wall, tokens, ttft, gaps, reference) -> None:
    runner = engine.core.decode_runner
    prompt_tokens = sum(len(p) for p, _ in reqs)
    figures = {
        "model": args.model,
        "device": str(engine.device),
        "dtype": str(dtype).removeprefix("torch."),
        "kv_cache_dtype": engine.stats()["kv_cache_dtype"],
        "threads": torch.get_num_threads(),
        "api": args.api,
        "workload": args.workload,
        "cuda_graphs": runner is not None,
        "capture_s": runner.capture_seconds if runner else None,
        "max_batch_size": args.max_batch_size,
        "max_num_batched_tokens": engine.scheduler.max_num_batched_tokens,
        "temperature": args.temperature,
        "seed": args.seed,
        "vocab_size": args.vocab_size or model.config.vocab_size,
        "requests": len(reqs),
        "prompt_tokens": prompt_tokens,
        "output_tokens": tokens,
        "wall_s": wall,
        "output_tok_s": tokens / wall,
        "total_tok_s": (tokens + prompt_tokens) / wall,
        "ttft_s": percentiles(ttft),
        "per_token_latency_s": percentiles(gaps),
        "decode_floor": decode_floor(engine, model, args.bandwidth),
        "reference_tok_s": reference,
        "ratio_to_reference": tokens / wall / reference if reference else None,
        "overlap": engine.core.overlap,
        "prefill_graphs": engine.core.prefill_runner is not None,
        "engine": {
            k: v
            for k, v in engine.stats().items()
            if k in ("steps", "overlapped_steps", "preemptions", "pages_total", "prefix_cache_hit_rate")
        },
    }
    if engine.device.type == "cuda":
        figures["gpu"] = torch.cuda.get_device_name(engine.device)
    graphs = f"CUDA graphs (captured in {runner.capture_seconds:.2f} s)" if runner else "eager decode"
    if runner:
        graphs += ", decode steps overlap the host" if engine.core.overlap else ", overlap off"
        if engine.core.prefill_runner is not None:
            graphs += f", prefill graphs (captured in {engine.core.prefill_runner.capture_seconds:.2f} s)"
    print(
        f"model {args.model} on {figures.get('gpu', figures['device'])} ({figures['dtype']}, "
        f"KV cache {figures['kv_cache_dtype']}, "
        f"{figures['threads']} threads), {model.num_parameters():,} parameters, {graphs}, api {args.api}"
    )
    print(
        f"{len(reqs)} requests, prompt {args.prompt_len[0]}-{args.prompt_len[1]}, "
        f"output {args.output_len[0]}-{args.output_len[1]} tokens, max batch {args.max_batch_size}, "
        f"{figures['max_num_batched_tokens']} tokens a step, "
        f"temperature {args.temperature}"
    )
    print(
        f"output: {tokens} tokens in {wall:.2f} s = {tokens / wall:,.1f} tok/s "
        f"(prompt + output {figures['total_tok_s']:,.1f} tok/s)"
    )
    if reference:
        print(
            f"transformers generate (same workload, greedy, the faster call): {reference:,.1f} tok/s; "
            f"engine / transformers = {figures['ratio_to_reference']:.2f}x"
        )
    for name, key in (("time to first token", "ttft_s"), ("per-token latency", "per_token_latency_s")):
        p = figures[key]
        if p:
            print(
                f"{name}: mean {p['mean'] * 1e3:.1f} ms, p50 {p['p50'] * 1e3:.1f}, "
                f"p90 {p['p90'] * 1e3:.1f}, p99 {p['p99'] * 1e3:.1f} ms"
            )
    f = figures["decode_floor"]
    if f:
        print(
            f"decode at batch {f['batch']}: {f['steps']} steps, {f['step_ms']:.3g} ms a step "
            f"({f['decode_tok_s']:,.0f} tok/s); floor {f['floor_ms']:.3g} ms = weights {f['weight_gb']:.3g} GB "
            f"+ KV of {f['context_tokens_per_step']:,.0f} tokens {f['kv_gb_per_step']:.3g} GB at "
            f"{f['bandwidth_tb_s']:.3g} TB/s; achieved {f['fraction_of_floor']:.1%} of the floor "
            f"(all {f['all_decode_steps']} decode steps: {f['all_decode_fraction_of_floor']:.1%})"
        )
        if f["graph_replay_ms"]:
            print(
                f"  of a {f['step_ms']:.3g} ms decode step, the graph replay (model body on the device) takes "
                f"{f['graph_replay_ms']:.3g} ms; the rest is the LM head, sampling and host work"
            )
    print(f"engine: {figures['engine']}")
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    sys.exit(main())
