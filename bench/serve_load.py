"""Load test of the HTTP server: concurrent streaming clients, throughput and latency percentiles.

    uv run python bench/serve_load.py --model configs/model/tiny.json          # builds a random model, starts the server
    uv run python bench/serve_load.py --model out/sft --device cuda --num-requests 512 --concurrency 128
    uv run python bench/serve_load.py --url http://127.0.0.1:8000 --vocab-size 32000   # a server already running
    python3 bench/serve_load.py --model configs/model/qwen3-0.6b.json --dtype bfloat16 --devices 1 2   # 1 vs 2 GPUs

Every request is a streamed POST /v1/completions with a prompt of random token ids and
ignore_eos, so it generates exactly its output length; the workload (lengths, seed) matches
bench/engine_throughput.py, whose numbers are the engine without HTTP. --api chat sends chat
messages of random words instead. Reports requests/s, output tokens/s, time to first token
(TTFT), time per output token after the first (TPOT), the gap between stream chunks (ITL) and
end-to-end latency, as percentiles. --model takes a model directory, or a ModelConfig JSON for
which random weights and a small tokenizer are made in a temporary directory. --devices N
serves on N GPUs (one engine each); several values (--devices 1 2) run the same workload on a
fresh server for each and print the figures of every run, then the throughput ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

WORDS = ("the model reads text and writes more text 模型 阅读 文本 并且 写出 更多 small fast bilingual "
         "language 语言 server client stream token page cache batch").split()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="base URL of a running server, e.g. http://127.0.0.1:8000")
    where.add_argument("--model", help="model directory or ModelConfig JSON: start astrai-serve on it")
    p.add_argument("--device", default="cpu", help="server --device when --model is given (default: %(default)s)")
    p.add_argument("--devices", type=int, nargs="+", default=None, metavar="N",
                   help="server --devices N (one engine per GPU) when --model is given, instead of --device; "
                        "several values run the workload once per value, e.g. --devices 1 2")
    p.add_argument("--dtype", default="auto", help="server --dtype when --model is given (default: %(default)s)")
    p.add_argument("--max-batch-size", type=int, default=64, help="server --max-batch-size (default: %(default)s)")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra astrai-serve argument when --model is given (repeatable, e.g. --server-arg=--num-pages=4096)")
    p.add_argument("--api", choices=("completions", "chat"), default="completions")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=None, help="most requests in flight (default: all at once)")
    p.add_argument("--rate", type=float, default=None, help="Poisson arrival rate in requests/s (default: all at once)")
    p.add_argument("--prompt-len", type=int, nargs=2, default=[16, 128], metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=[16, 128], metavar=("MIN", "MAX"))
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--vocab-size", type=int, default=None,
                   help="prompt ids are drawn below this (default: the tokenizer's with --model, else 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = p.parse_args(argv)
    if args.devices and args.url:
        p.error("--devices starts servers: use it with --model, not --url")
    if args.devices and min(args.devices) < 1:
        p.error(f"--devices: GPU counts must be at least 1, got {args.devices}")
    return args


# -- the server under test ----------------------------------------------------------------------
def prepare_model(spec: str, workdir: Path) -> Path:
    """A model directory: `spec` itself, or random weights + a small tokenizer for a config JSON."""
    path = Path(spec)
    if path.is_dir():
        return path
    import torch

    from astrai.core.auto import AutoModel
    from astrai.core.config import ModelConfig
    from astrai.core.tokenizer_trainer import train_tokenizer

    rng = random.Random(0)
    texts = (" ".join(rng.choice(WORDS) for _ in range(64)) for _ in range(2000))
    tokenizer = train_tokenizer(texts, vocab_size=1024, min_frequency=2, show_progress=False)
    config = ModelConfig.from_json(path)
    config.vocab_size = max(config.vocab_size, tokenizer.vocab_size)
    torch.manual_seed(0)
    out = workdir / "model"
    AutoModel.save_pretrained(AutoModel.from_config(config), out, tokenizer=tokenizer)
    return out


def start_server(args, model_dir: Path, log_path: Path, devices: int | None = None) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    where = ["--devices", str(devices)] if devices else ["--device", args.device]
    argv = [sys.executable, "-m", "astrai.serve.cli", "--model", str(model_dir), "--port", str(port), *where,
            "--dtype", args.dtype, "--max-batch-size", str(args.max_batch_size), "--log-level", "warning",
            *args.server_arg]
    if args.api_key:
        argv += ["--api-key", args.api_key]
    with log_path.open("w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"astrai-serve exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop_server(proc)
    raise SystemExit(f"astrai-serve not ready after 600 s:\n{log_path.read_text()}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


# -- the load -----------------------------------------------------------------------------------
@dataclass
class Result:
    start: float
    first: float | None = None
    end: float = 0.0
    tokens: int = 0
    chunk_times: list[float] = field(default_factory=list)
    error: str | None = None


def make_workload(args) -> list[tuple[list[int], int]]:
    rng = random.Random(args.seed)
    vocab = args.vocab_size or 256
    low = 5 if vocab > 5 else 0  # our special tokens take ids 0..4
    return [([rng.randrange(low, vocab) for _ in range(rng.randint(*args.prompt_len))], rng.randint(*args.output_len))
            for _ in range(args.num_requests)]


def request_body(args, prompt: list[int], output_len: int, rng: random.Random) -> tuple[str, dict]:
    common = {"max_tokens": output_len, "temperature": args.temperature, "ignore_eos": True, "stream": True,
              "stream_options": {"include_usage": True}}
    if args.api == "chat":
        content = " ".join(rng.choice(WORDS) for _ in range(len(prompt)))
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": content}], **common}
    return "/v1/completions", {"prompt": prompt, **common}


async def one_request(http: httpx.AsyncClient, path: str, body: dict) -> Result:
    result = Result(start=time.perf_counter())
    try:
        async with http.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    result.tokens = chunk["usage"]["completion_tokens"]
                if any(c.get("text") or (c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
                    now = time.perf_counter()
                    result.first = result.first or now
                    result.chunk_times.append(now)
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
    result.end = time.perf_counter()
    return result


async def run_load(args, url: str) -> tuple[list[Result], float]:
    workload = make_workload(args)
    rng = random.Random(args.seed + 1)
    limit = asyncio.Semaphore(args.concurrency or len(workload))
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency or len(workload) + 8, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=None, limits=limits) as http:
        # One short request first so start-up costs (first-request set-up) stay out of the figures.
        await one_request(http, *request_body(args, workload[0][0][:4], 2, rng))

        async def limited(path, body, delay):
            await asyncio.sleep(delay)
            async with limit:
                return await one_request(http, path, body)

        delays, t = [], 0.0
        for _ in workload:
            delays.append(t)
            if args.rate:
                t += rng.expovariate(args.rate)
        start, cpu = time.perf_counter(), time.process_time()
        tasks = [limited(*request_body(args, prompt, n, rng), d) for (prompt, n), d in zip(workload, delays)]
        results = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
        # This client is one Python process that parses every chunk: when its CPU time nears the
        # elapsed time, the client, not the server, sets the pace.
        print(f"load client: {time.process_time() - cpu:.1f} CPU s in {elapsed:.1f} s", flush=True)
        return results, elapsed


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan"), "mean": float("nan")}
    values = sorted(values)
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "mean": statistics.fmean(values)}


def summarize(results: list[Result], elapsed: float) -> dict:
    ok = [r for r in results if r.error is None]
    ttft = [r.first - r.start for r in ok if r.first]
    tpot = [(r.chunk_times[-1] - r.first) / (r.tokens - 1) for r in ok if r.first and r.tokens > 1]
    itl = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    tokens = sum(r.tokens for r in ok)
    return {
        "requests": len(results), "failed": len(results) - len(ok), "elapsed_s": elapsed,
        "requests_per_s": len(ok) / elapsed, "output_tokens": tokens, "output_tokens_per_s": tokens / elapsed,
        "ttft_ms": {k: v * 1e3 for k, v in percentiles(ttft).items()},
        "tpot_ms": {k: v * 1e3 for k, v in percentiles(tpot).items()},
        "itl_ms": {k: v * 1e3 for k, v in percentiles(itl).items()},
        "e2e_s": percentiles([r.end - r.start for r in ok]),
        "errors": sorted({r.error for r in results if r.error})[:5],
    }


def report(summary: dict, args) -> None:
    print(f"{summary['requests']} requests ({summary['failed']} failed) in {summary['elapsed_s']:.2f} s, "
          f"api {args.api}, concurrency {args.concurrency or 'all'}, rate {args.rate or 'all at once'}")
    print(f"  {summary['requests_per_s']:.2f} requests/s, {summary['output_tokens_per_s']:.1f} output tokens/s "
          f"({summary['output_tokens']} tokens)")
    for name, unit in (("ttft_ms", "ms"), ("tpot_ms", "ms"), ("itl_ms", "ms"), ("e2e_s", "s")):
        p = summary[name]
        print(f"  {name.split('_')[0].upper():5s} p50 {p['p50']:8.2f} {unit}  p90 {p['p90']:8.2f} {unit}  "
              f"p99 {p['p99']:8.2f} {unit}  mean {p['mean']:8.2f} {unit}")
    for error in summary["errors"]:
        print("  error:", error)


def one_run(args, model_dir: Path | None, tmp: Path, devices: int | None) -> dict:
    """Start a server (unless --url), run the workload, stop it; print and return the figures."""
    proc, url = None, args.url
    if model_dir is not None:
        where = f"{devices} GPU(s)" if devices else args.device
        print(f"starting astrai-serve on {model_dir} ({where}) ...", flush=True)
        proc, url = start_server(args, model_dir, tmp / f"server-{devices or args.device}.log", devices)
    try:
        results, elapsed = asyncio.run(run_load(args, url))
        if proc is not None:
            headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}  # /stats needs the key too
            stats = httpx.get(url + "/stats", headers=headers, timeout=30).json()
            engine = stats["engine"]
            per_engine = [w.get("stats", {}).get("generated_tokens") for w in stats.get("workers", [])]
            print(f"engines: {stats.get('engines', 1)}, {engine['steps']} steps, {engine['generated_tokens']} tokens "
                  f"generated (per engine: {per_engine}), {engine['preemptions']} preemptions")
    finally:
        if proc is not None:
            stop_server(proc)
    summary = summarize(results, elapsed)
    summary["devices"] = devices
    report(summary, args)
    if args.json:
        print(json.dumps(summary))
    return summary


def compare(runs: list[dict]) -> None:
    base = runs[0]
    print(f"\nthroughput against {base['devices']} GPU(s) ({base['output_tokens_per_s']:.1f} output tokens/s):")
    for run in runs[1:]:
        ratio = run["output_tokens_per_s"] / base["output_tokens_per_s"] if base["output_tokens_per_s"] else float("nan")
        per_gpu = ratio * base["devices"] / run["devices"]
        print(f"  {run['devices']} GPU(s): {run['output_tokens_per_s']:.1f} output tokens/s = {ratio:.2f}x "
              f"({per_gpu:.0%} of linear), TTFT p50 {run['ttft_ms']['p50']:.1f} ms vs {base['ttft_ms']['p50']:.1f} ms")


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = None
        if args.model:
            model_dir = prepare_model(args.model, Path(tmp))
            if args.vocab_size is None:
                from astrai.core.tokenizer import AutoTokenizer

                args.vocab_size = AutoTokenizer.from_pretrained(model_dir).vocab_size
        runs = []
        for devices in args.devices or [None]:
            if len(args.devices or []) > 1:
                print(f"\n== --devices {devices} ==", flush=True)
            runs.append(one_run(args, model_dir, Path(tmp), devices))
    if len(runs) > 1:
        compare(runs)


if __name__ == "__main__":
    main()
