"""What structured output costs the requests beside it: one engine, a batch of free requests,
and in the same batch either the same number constrained to a JSON schema
(SamplingParams.structured_output) or as many free ones that write as many tokens as the
constrained ones did. The figure is the free requests' output tok/s in the first case over the
second, measured side by side in one process (issue 20 asks < 5% loss): the median of
--repeats alternating pairs.

    uv run python bench/structured_output.py                               # tiny model, CPU
    python3 bench/structured_output.py --model configs/model/qwen3-0.6b.json --device cuda \\
        --num-free 224 --num-constrained 32 --output-len 256

Models from a ModelConfig JSON get random weights and a small trained tokenizer (as
bench/serve_load.py makes them); the constrained requests' schema keeps their JSON short
(enums, bounded integers), so they finish early and their rows go back to free requests as
they would in a server. Each case runs once untimed first (grammar compiled, kernels built).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import prepare_model  # noqa: E402 - bench/ scripts share their helpers this way

from astrai.core.auto import AutoModel  # noqa: E402
from astrai.core.engine import InferenceEngine, SamplingParams  # noqa: E402
from astrai.core.engine.host_settings import quiet_gc  # noqa: E402
from astrai.core.tokenizer import AutoTokenizer  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "enum": ["yes", "no", "maybe"]},
        "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["answer", "confidence", "tags"],
    "additionalProperties": False,
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="configs/model/tiny.json", help="model directory or ModelConfig JSON")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--num-free", type=int, default=56)
    p.add_argument("--num-constrained", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: the engine's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each case, alternating, after a warm-up run")
    return p.parse_args(argv)


def run(engine, prompts, params) -> tuple[float, list]:
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = engine.generate(prompts, params)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main(argv=None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = prepare_model(args.model, Path(tmp))
        dtype = {"auto": torch.bfloat16 if args.device.startswith("cuda") else torch.float32}.get(
            args.dtype, args.dtype
        )
        model = AutoModel.from_pretrained(model_dir, dtype=dtype, device=args.device)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = args.num_free + args.num_constrained
    settings = {"max_batch_size": batch}
    if args.max_num_batched_tokens:
        settings["max_num_batched_tokens"] = args.max_num_batched_tokens
    engine = InferenceEngine(model, tokenizer, device=args.device, **settings)
    quiet_gc()
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(tokenizer.vocab_size) for _ in range(args.prompt_len)] for _ in range(batch)]
    free = SamplingParams(max_tokens=args.output_len, temperature=1.0, ignore_eos=True)
    constrained = [
        SamplingParams(max_tokens=args.output_len, temperature=1.0, seed=i, structured_output={"json_schema": SCHEMA})
        for i in range(args.num_constrained)
    ]
    constrained_params = [free] * args.num_free + constrained
    warm = measure(engine, prompts, constrained_params, args)  # grammar compiled, kernels built
    # The free batch-mates write as many tokens as their constrained counterparts did (ignore_eos,
    # max_tokens = that length): both cases do the same work, and only the grammar differs.
    extra_free = [
        SamplingParams(max_tokens=n, temperature=1.0, seed=i, ignore_eos=True)
        for i, n in enumerate(warm["mate_lengths"])
    ]
    cases = {"constrained batch-mates": constrained_params, "free batch-mates": [free] * args.num_free + extra_free}
    measure(engine, prompts, cases["free batch-mates"], args)
    runs = {name: [] for name in cases}
    for _ in range(args.repeats):  # alternating, so that drifting clocks or load hit both cases alike
        for name, params in cases.items():
            runs[name].append(measure(engine, prompts, params, args))
    figures = {name: median_run(r) for name, r in runs.items()}
    ratios = [
        c["free_tok_s"] / f["free_tok_s"] for c, f in zip(runs["constrained batch-mates"], runs["free batch-mates"])
    ]
    figures["free tok/s with constrained / with free batch-mates"] = statistics.median(ratios)
    figures["each repeat's ratio"] = [round(r, 4) for r in ratios]
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(json.dumps({"device": device, "model": args.model, **figures}, indent=1))
    return figures


def median_run(runs: list[dict]) -> dict:
    """The run of median time, with every run's seconds beside it."""
    chosen = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
    return {**{k: v for k, v in chosen.items() if k != "mate_lengths"}, "all_seconds": [r["seconds"] for r in runs]}


def measure(engine, prompts, params, args) -> dict:
    """One run of a case: the free requests' output tok/s and the step counts."""
    before = engine.stats()
    seconds, out = run(engine, prompts, params)
    stats = {k: engine.stats()[k] - before[k] for k in ("steps", "overlapped_steps")}
    mates = out[args.num_free :]
    figures = {
        "seconds": seconds,
        "free_tok_s": sum(len(c.token_ids) for c in out[: args.num_free]) / seconds,
        # where a loss comes from: more steps, or steps that no longer overlap the host's work
        "steps": stats["steps"],
        "overlapped_steps": stats["overlapped_steps"],
        "batch_mates_tokens": sum(len(c.token_ids) for c in mates),
        "mate_lengths": [len(c.token_ids) for c in mates],
    }
    if params[-1].structured_output is not None:
        figures["constrained_valid"] = f"{sum(1 for c in mates if _parses(c.text))}/{len(mates)}"
    return figures


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


if __name__ == "__main__":
    main()
