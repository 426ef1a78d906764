"""Host time of one engine step at a large decode batch, outside the model's forward pass.

    uv run python bench/engine_step_profile.py                      # tiny.json, 256 sequences, CPU
    uv run python bench/engine_step_profile.py --profile 25         # plus the top cProfile entries
    uv run python bench/engine_step_profile.py --batch 512 --rollout   # sampled as GRPO's rollouts are
    uv run python bench/engine_step_profile.py --batch 512 --rollout --sampler-only --model M.json
    uv run python bench/engine_step_profile.py --batch 512 --rollout --padded --scheduler-steps 8
    python3 bench/engine_step_profile.py --model configs/model/qwen3-0.6b.json --device cuda \
        --prompt-len 384 --kv-cache-dtype fp8 --kernels 15                 # where a step's GPU time goes

N requests are admitted and prefilled, then only decode steps are timed. The model forward is
timed with forward hooks, so "host" is what a step costs besides the model: scheduling,
metadata, sampling, stop checks and emitting tokens. On a GPU that time is not hidden behind
the device (each step reads its sampled tokens), so it caps tokens/s. Times are this thread's
CPU time (time.thread_time), so other load on a shared machine barely moves them. Meant for the
CPU (and eager CUDA): a replayed CUDA graph bypasses the hooks, and on a GPU
bench/engine_throughput.py reports replay time against step time instead.

--kernels N profiles --steps more decode steps with torch.profiler and prints the N costliest
kernels per step (device time on CUDA, CPU time of the ops on the CPU), with launches per step:
the breakdown of a decode step (attention, GEMMs, norms, ...) that a kernel change should move.
Kernels inside replayed CUDA graphs are listed too (per kernel, from CUPTI).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import pstats
import statistics
import sys
import time
import timeit

import torch

from astrai.core.auto import AutoModel
from astrai.core.config import ModelConfig
from astrai.core.engine import InferenceEngine, SamplingParams


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="configs/model/tiny.json")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=40, help="decode steps timed")
    p.add_argument("--stream", action="store_true", help="give every request a sink, as astream does")
    p.add_argument(
        "--sampler-only",
        action="store_true",
        help="time only the sampler's draw and read-back of --batch rows over random logits of the model's "
        "vocabulary (best of 15 repeats: steadier than a whole step on a shared machine)",
    )
    p.add_argument(
        "--rollout",
        action="store_true",
        help="sample as GRPO's rollouts do: temperature 1, a seed per request, the chosen tokens' logprobs",
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="print the N costliest cProfile entries, by own time and by cumulative time",
    )
    p.add_argument(
        "--kernels",
        type=int,
        default=0,
        metavar="N",
        help="then profile --steps more steps and print the N costliest kernels per step",
    )
    p.add_argument(
        "--scheduler-steps",
        type=int,
        default=1,
        metavar="K",
        help="the engine's num_scheduler_steps: decode steps launched per scheduling (multi-step decoding "
        "needs the runner: CUDA graphs or --padded); times are then per decode step",
    )
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument(
        "--padded",
        action="store_true",
        help="decode through the static padded buffers without capture (what graphs replay; any device)",
    )
    return p.parse_args(argv)


def clock() -> float:
    return time.thread_time()


class ForwardTimer:
    """Wall time spent inside the forward of `modules` (the model, or its body and head), through hooks."""

    def __init__(self, modules, device: torch.device):
        self.total, self._start, self.device = 0.0, 0.0, device
        for m in modules:
            m.register_forward_pre_hook(self._pre)
            m.register_forward_hook(self._post)

    def _pre(self, *_):
        self._start = clock()

    def _post(self, *_):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.total += clock() - self._start


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = ModelConfig.from_json(args.model)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = AutoModel.from_config(config, dtype=dtype, device=args.device)
    engine = InferenceEngine(
        model,
        None,
        max_batch_size=args.batch,
        max_num_batched_tokens=max(2048, args.batch),
        page_size=16,
        device=args.device,
        cuda_graphs=args.cuda_graphs,
        kv_cache_dtype=args.kv_cache_dtype,
        num_scheduler_steps=args.scheduler_steps,
    )
    if args.padded:
        from astrai.core.engine.cuda_graphs import DecodeRunner

        engine.core.decode_runner = DecodeRunner(
            engine.model, engine.cache, engine.core.backend, args.batch, engine.max_model_len, capture=False
        )
    if args.sampler_only:
        return time_sampler(engine, args, config.vocab_size)
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=args.steps + 50, temperature=0, ignore_eos=True)
    if args.rollout:
        params = dataclasses.replace(params, temperature=1.0, logprobs=0)
    for i in range(args.batch):
        prompt = torch.randint(5, config.vocab_size, (args.prompt_len,), generator=g).tolist()
        if args.rollout:
            params = dataclasses.replace(params, seed=i)
        if args.stream:
            # A plain callable sink: events pile up in a list, as in a stream's queue.
            request = engine.intake.build(prompt, params, None, sink=[].append)
            engine._submit(request)
        else:
            engine.add_request(prompt, params)
    while len(engine.scheduler.running) < args.batch or any(s.num_pending > 1 for s in engine.scheduler.running):
        engine.step()
    for _ in range(3):  # warm-up decode steps (any CUDA graphs were captured when the engine was built)
        engine.step()
    # The padded path calls the body and the LM head itself; the eager path calls the model.
    runner = engine.core.decode_runner
    modules = [engine.model.model, engine.model.lm_head] if runner is not None else [engine.model]
    timer = ForwardTimer(modules, engine.device)
    profiler = cProfile.Profile() if args.profile else None
    steps, forwards = [], []
    if profiler:
        profiler.enable()
    done = 0
    while done < args.steps:  # per decode step: a multi-step group counts as its K steps
        forward_before, start, before = timer.total, clock(), engine.core.num_steps
        engine.step()
        taken = max(1, engine.core.num_steps - before)
        steps += [(clock() - start) / taken] * taken
        forwards += [(timer.total - forward_before) / taken] * taken
        done += taken
    if profiler:
        profiler.disable()
    step_ms, forward_ms = statistics.median(steps) * 1e3, statistics.median(forwards) * 1e3
    host_ms = statistics.median(s - f for s, f in zip(steps, forwards)) * 1e3
    graphs = "CUDA graphs" if runner is not None and runner.graphs else "padded static buffers" if runner else "eager"
    print(
        f"{args.model} on {engine.device} ({graphs}), {args.batch} decoding sequences, {len(steps)} steps "
        f"({args.scheduler_steps} a scheduling), "
        f"median thread CPU ms: step {step_ms:.2f}, model forward {forward_ms:.2f}, host (rest) {host_ms:.2f}"
    )
    if profiler:
        stats = pstats.Stats(profiler)
        stats.sort_stats("tottime").print_stats(args.profile)
        stats.sort_stats("cumulative").print_stats(args.profile)  # which of our calls holds that time
    if args.kernels:
        print_kernels(engine, args.steps, args.kernels)
    return 0


def time_sampler(engine: InferenceEngine, args, vocab: int) -> int:
    """Host time of the sampler for one decode batch: per-row numbers, the draw, the read-back."""
    from astrai.core.engine.sampler import SampleRow

    # As in the engine: each request has its own (validated) parameters, shared by its n samples
    # (GRPO: a request per prompt, n = 8, a seed each).
    group = 8 if args.rollout else 1
    params = [
        SamplingParams(temperature=1.0 if args.rollout else 0, logprobs=0 if args.rollout else None).validate()
        for _ in range(-(-args.batch // group))
    ]
    rows = [
        SampleRow(params[i // group], (i * 7919) << 40 if args.rollout else None, [], [], 100 + i)
        for i in range(args.batch)
    ]
    logits = torch.randn(args.batch, vocab, device=engine.device)
    sampler = engine.core.sampler
    best = min(timeit.repeat(lambda: sampler.draw(logits, rows).result(), number=20, repeat=15)) / 20
    print(
        f"sampler on {engine.device}, {args.batch} rows, vocab {vocab}: draw + result {best * 1e3:.3f} ms (best of 15)"
    )
    return 0


def print_kernels(engine: InferenceEngine, steps: int, top: int) -> None:
    """The `top` costliest kernels over `steps` decode steps, per step."""
    from torch.profiler import ProfilerActivity, profile

    on_cuda = engine.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step()
        if on_cuda:
            torch.cuda.synchronize(engine.device)
    if on_cuda:  # kernels only: an op's device time is its kernels' again
        rows = [
            (e.self_device_time_total, e.count, e.key)
            for e in prof.key_averages()
            if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0
        ]
    else:
        rows = [(e.self_cpu_time_total, e.count, e.key) for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(us for us, _, _ in rows)
    what = "device" if on_cuda else "CPU (self time of each op)"
    print(f"{what} time per decode step: {total / steps / 1e3:.3f} ms over {steps} steps; costliest:")
    for us, count, name in sorted(rows, reverse=True)[:top]:
        print(f"  {us / steps / 1e3:8.3f} ms {us / total:6.1%}  x{count / steps:6.1f}  {name[:100]}")


if __name__ == "__main__":
    sys.exit(main())
