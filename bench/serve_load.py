"""Load test of the HTTP server: concurrent streaming clients, throughput and latency percentiles.

    uv run python bench/serve_load.py --model configs/model/tiny.json          # builds a random model, starts the server
    uv run python bench/serve_load.py --model runs/sft-lora/export --device cuda --num-requests 512 --concurrency 128
    uv run python bench/serve_load.py --url http://127.0.0.1:8000 --vocab-size 32000   # a server already running
    python3 bench/serve_load.py --model configs/model/qwen3-0.6b.json --dtype bfloat16 --devices 1 2   # 1 vs 2 GPUs
    python3 bench/serve_load.py --model M --device cuda --dtype bfloat16 --workload mixed --engine-baseline
    python3 bench/serve_load.py --model M --device cuda --dtype bfloat16 --workload short --engine-baseline
    python3 bench/serve_load.py --model M --device cuda --dtype bfloat16 --workload decode256 --engine-baseline

On one H100 (the server against the engine alone, on the same requests):

    python3 bench/serve_load.py --model configs/model/qwen3-0.6b.json --device cuda --dtype bfloat16 \\
        --workload short --engine-baseline --client-procs 6

Every request is a streamed POST /v1/completions with a prompt of random token ids and
ignore_eos, so it generates exactly its output length. The requests are those of
bench/engine_throughput.py, token for token, for the same seed and vocabulary (both draw them in
bench/workloads.py; with --model, below the ids the server accepts), whose numbers are the engine
without HTTP. --api chat sends chat messages of random words instead. Reports requests/s, output
tokens/s, time to first token (TTFT), time per output token after the first (TPOT), the gap
between stream chunks (ITL) and end-to-end latency, as percentiles. --model takes a model
directory, or a ModelConfig JSON for which random weights and a small tokenizer are made in a
temporary directory. --devices N serves on N GPUs (one engine each); several values
(--devices 1 2) run the same workload on a fresh server for each and print the figures of every
run, then the throughput ratios.

Workload presets (bench/workloads.py, as bench/engine_throughput.py; explicit flags still win),
each with max batch 256 and a budget of 8192 tokens a step (server --max-num-batched-tokens):
  mixed      256 requests, prompt and output lengths uniform in 100-1024
  short      512 requests, prompts uniform in 16-128, outputs uniform in 64-128
  decode256  256 requests, prompt 256, output 256

The load generator must not be the limit. The requests are dealt round-robin to --client-procs
processes (bench/load_clients.py), each with its own asyncio loop and connection pool, started
at one common moment; each reports its CPU time over the timed run, and the busiest one's share
of a core is printed (with a warning when it nears a whole core). --client openai sends through
the official openai client instead of raw httpx. When the bench starts the server, the CPU time
of each server process (main, LitServe's manager and HTTP process, each engine worker) over the
timed run is printed too. By default the same workload shape (other prompts, seed + 2) runs
once untimed first, as engine_throughput's warm-up does, so kernel compilation and pool growth
stay out of the figures. --engine-baseline first runs bench/engine_throughput.py on the same
model directory and workload (before the server takes the device) and prints the server's share
of the engine's throughput and the ratio of their TTFT p50.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from load_clients import LoadRun, Result, run_load  # bench/ is on sys.path when a script of it runs
from workloads import FIRST_ORDINARY_ID, WORKLOADS, arrival_delays, draw

WORDS = (
    "the model reads text and writes more text 模型 阅读 文本 并且 写出 更多 small fast bilingual "
    "language 语言 server client stream token page cache batch"
).split()
BUSY_CLIENT = 0.7  # a client process above this share of a core may be what sets the pace


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="base URL of a running server, e.g. http://127.0.0.1:8000")
    where.add_argument("--model", help="model directory or ModelConfig JSON: start astrai-serve on it")
    p.add_argument(
        "--workload",
        choices=sorted(WORKLOADS),
        default=None,
        help="a preset for the lengths, request count, max batch size and token budget (see above)",
    )
    p.add_argument("--device", default="cpu", help="server --device when --model is given (default: %(default)s)")
    p.add_argument(
        "--devices",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="server --devices N (one engine per GPU) when --model is given, instead of --device; "
        "several values run the workload once per value, e.g. --devices 1 2",
    )
    p.add_argument("--dtype", default="auto", help="server --dtype when --model is given (default: %(default)s)")
    p.add_argument("--max-batch-size", type=int, default=64, help="server --max-batch-size (default: %(default)s)")
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="server --max-num-batched-tokens (default: the server's for its device; the presets: 8192)",
    )
    p.add_argument(
        "--kv-cache-dtype",
        choices=("auto", "fp8"),
        default="auto",
        help="server --kv-cache-dtype (default: %(default)s)",
    )
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra astrai-serve argument when --model is given (repeatable, e.g. --server-arg=--num-pages=4096)",
    )
    p.add_argument("--api", choices=("completions", "chat"), default="completions")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    p.add_argument(
        "--client",
        choices=("httpx", "openai"),
        default="httpx",
        help="raw httpx with our own SSE parsing, or the official openai client (default: %(default)s)",
    )
    p.add_argument(
        "--client-procs",
        type=int,
        default=4,
        help="client processes the requests are dealt to, round-robin (default: %(default)s)",
    )
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="most requests in flight, split over the client processes (default: all at once)",
    )
    p.add_argument("--rate", type=float, default=None, help="Poisson arrival rate in requests/s (default: all at once)")
    p.add_argument("--prompt-len", type=int, nargs=2, default=[16, 128], metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=[16, 128], metavar=("MIN", "MAX"))
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="with --url: prompt ids are drawn below this (default: 256); with --model the ids the "
        "server accepts (its tokenizer's vocabulary), given to the engine baseline too",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="first run the same workload shape once, untimed, on other prompts (default: on)",
    )
    p.add_argument(
        "--engine-baseline",
        action="store_true",
        help="first run bench/engine_throughput.py on the same model and workload, and print the "
        "server's share of its throughput (needs --model)",
    )
    p.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    preset = p.parse_known_args(argv)[0].workload
    if preset:
        p.set_defaults(**WORKLOADS[preset])
    args = p.parse_args(argv)
    if args.devices and args.url:
        p.error("--devices starts servers: use it with --model, not --url")
    if args.devices and min(args.devices) < 1:
        p.error(f"--devices: GPU counts must be at least 1, got {args.devices}")
    if args.client_procs < 1:
        p.error(f"--client-procs must be at least 1, got {args.client_procs}")
    if args.model and args.vocab_size is not None:
        p.error("--vocab-size is for --url: with --model the vocabulary the server accepts is used")
    if args.engine_baseline and not args.model:
        p.error("--engine-baseline runs the engine on the model: use it with --model")
    if args.engine_baseline and args.api == "chat":
        p.error("--engine-baseline compares token-id prompts: use --api completions")
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


def served_vocab_size(model_dir: Path) -> int:
    """Prompt ids are drawn below this: the smaller of the vocab_size saved in the model
    directory's config (prepare_model may have enlarged the JSON's) and the tokenizer's, since
    the server refuses prompt ids the tokenizer does not know. The engine baseline is given the
    same value, so both benches send the same prompts."""
    from astrai.core.checkpoint import load_config
    from astrai.core.tokenizer import AutoTokenizer

    return min(load_config(model_dir).vocab_size, AutoTokenizer.from_pretrained(model_dir).vocab_size)


def server_budget(args) -> int:
    """The token budget a step: --max-num-batched-tokens, else astrai-serve's default for the
    device, made explicit so that the engine baseline runs with the same value."""
    from astrai.serve.config import CPU_DEFAULTS, GPU_DEFAULTS

    if args.max_num_batched_tokens:
        return args.max_num_batched_tokens
    on_gpu = bool(args.devices) or args.device != "cpu"
    return (GPU_DEFAULTS if on_gpu else CPU_DEFAULTS)["max_num_batched_tokens"]


def start_server(args, model_dir: Path, log_path: Path, devices: int | None = None) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    where = ["--devices", str(devices)] if devices else ["--device", args.device]
    argv = [
        sys.executable,
        "-m",
        "astrai.serve.cli",
        "--model",
        str(model_dir),
        "--port",
        str(port),
        *where,
        "--dtype",
        args.dtype,
        "--max-batch-size",
        str(args.max_batch_size),
        "--log-level",
        "warning",
    ]
    if getattr(args, "max_num_batched_tokens", None):  # serve_soak passes a namespace without these
        argv += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if getattr(args, "kv_cache_dtype", None):
        argv += ["--kv-cache-dtype", args.kv_cache_dtype]
    argv += args.server_arg
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


def auth_headers(args) -> dict:
    return {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}


def served_model_name(url: str, headers: dict) -> str | None:
    """The name GET /v1/models lists: what the openai client must send as `model`."""
    try:
        r = httpx.get(url + "/v1/models", headers=headers, timeout=30)
        return r.json()["data"][0]["id"] if r.status_code == 200 else None
    except (httpx.HTTPError, KeyError, IndexError, ValueError):
        return None


# -- the engine alone ---------------------------------------------------------------------------
def engine_baseline(args, model_dir: Path) -> dict:
    """bench/engine_throughput.py on the same model directory, device, dtype, workload and engine
    sizes, in its own process and before any server holds the device; its JSON figures."""
    device = "cuda" if args.devices else args.device
    argv = [
        sys.executable,
        str(Path(__file__).with_name("engine_throughput.py")),
        "--model",
        str(model_dir),
        "--device",
        device,
        "--num-requests",
        str(args.num_requests),
        "--prompt-len",
        *map(str, args.prompt_len),
        "--output-len",
        *map(str, args.output_len),
        "--max-batch-size",
        str(args.max_batch_size),
        "--max-num-batched-tokens",
        str(args.max_num_batched_tokens),
        "--temperature",
        str(args.temperature),
        "--seed",
        str(args.seed),
        "--vocab-size",
        str(args.vocab_size),
        "--kv-cache-dtype",
        args.kv_cache_dtype,
        "--json",
    ]
    if args.dtype != "auto":
        argv += ["--dtype", args.dtype]
    elif device != "cpu":
        print(
            "note: --dtype auto: the server loads the stored dtype, the engine baseline its default "
            "(bfloat16 on CUDA); pass --dtype to compare like with like",
            flush=True,
        )
    if args.rate:
        argv += ["--rate", str(args.rate)]
    print(f"engine alone: {shlex.join(argv[1:])}", flush=True)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)  # its stderr goes straight to ours
    figures = None
    for line in proc.stdout:
        if line.startswith("{"):
            figures = json.loads(line)
        else:
            print("  engine |", line, end="", flush=True)
    if proc.wait() != 0 or figures is None:
        raise SystemExit(f"bench/engine_throughput.py failed (exit status {proc.returncode})")
    return figures


def share_of_engine(summary: dict, engine: dict) -> dict:
    """The server's output tokens/s as a share of the engine's, and TTFT p50 as a ratio."""
    engine_ttft_ms = engine["ttft_s"]["p50"] * 1e3 if engine.get("ttft_s") else float("nan")
    return {
        "output_tok_s": summary["output_tokens_per_s"] / engine["output_tok_s"],
        "engine_output_tok_s": engine["output_tok_s"],
        "engine_ttft_p50_ms": engine_ttft_ms,
        "ttft_p50_ratio": summary["ttft_ms"]["p50"] / engine_ttft_ms if engine_ttft_ms else float("nan"),
        "same_workload": (engine["output_tokens"], engine.get("vocab_size"), engine.get("seed"))
        == (summary["expected_output_tokens"], summary["vocab_size"], summary["seed"]),
    }


# -- the load -----------------------------------------------------------------------------------
def request_body(args, prompt: list[int], output_len: int, rng: random.Random) -> tuple[str, dict]:
    common = {
        "max_tokens": output_len,
        "temperature": args.temperature,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.api == "chat":
        content = " ".join(rng.choice(WORDS) for _ in range(len(prompt)))
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": content}], **common}
    return "/v1/completions", {"prompt": prompt, **common}


def build_requests(args, seed: int) -> list[tuple[str, dict, float]]:
    """(path, body, arrival delay) of every request: engine_throughput's workload and delays."""
    reqs = draw(args.num_requests, args.prompt_len, args.output_len, args.vocab_size, seed)
    delays = arrival_delays(len(reqs), args.rate, seed)
    words = random.Random(seed + 1)
    return [(*request_body(args, prompt, n, words), delay) for (prompt, n), delay in zip(reqs, delays)]


def send_load(args, url: str, server_pid: int | None) -> LoadRun:
    """The warm-up (unless --no-warmup) and the timed run, from --client-procs processes."""
    timed = build_requests(args, args.seed)
    phases = ([build_requests(args, args.seed + 2)] if args.warmup else []) + [timed]
    first = request_body(args, [FIRST_ORDINARY_ID] * 4, 2, random.Random(args.seed))
    procs = max(1, min(args.client_procs, len(timed)))
    print(
        f"load: {len(timed)} requests from {procs} {args.client} client process(es)"
        + (", after an untimed warm-up run (seed + 2)" if args.warmup else ""),
        flush=True,
    )
    server_cpu = None
    if server_pid is not None:
        from soak_processes import tree_cpu_seconds

        server_cpu = lambda: tree_cpu_seconds(server_pid)  # noqa: E731
    return run_load(
        phases,
        first,
        url=url,
        api_key=args.api_key,
        client=args.client,
        model=served_model_name(url, auth_headers(args)),
        procs=procs,
        concurrency=args.concurrency,
        server_cpu=server_cpu,
    )


# -- the figures --------------------------------------------------------------------------------
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
    connection = sum(r.connection_error for r in results)
    return {
        "requests": len(results),
        "failed": len(results) - len(ok),
        "connection_errors": connection,
        "http_errors": len(results) - len(ok) - connection,
        "elapsed_s": elapsed,
        "requests_per_s": len(ok) / elapsed,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / elapsed,
        "ttft_ms": {k: v * 1e3 for k, v in percentiles(ttft).items()},
        "tpot_ms": {k: v * 1e3 for k, v in percentiles(tpot).items()},
        "itl_ms": {k: v * 1e3 for k, v in percentiles(itl).items()},
        "e2e_s": percentiles([r.end - r.start for r in ok]),
        "errors": sorted({r.error for r in results if r.error})[:5],
    }


def client_figures(args, load: LoadRun) -> dict:
    """The client processes' CPU over the timed run: near a whole core, the client sets the pace."""
    busiest = max((cpu / wall for cpu, wall in zip(load.cpu_s, load.wall_s) if wall > 0), default=0.0)
    return {
        "client": args.client,
        "client_procs": len(load.cpu_s),
        "client_cpu_s": sum(load.cpu_s),
        "client_cpu_per_proc_s": load.cpu_s,
        "client_busiest_core_frac": busiest,
        "client_may_be_limit": busiest > BUSY_CLIENT,
    }


ROLES = {
    "main": "astrai-serve main",
    "manager": "LitServe manager (forked)",
    "http": "HTTP server (forked)",
    "resource_tracker": "multiprocessing resource tracker",
}


def server_cpu_figures(load: LoadRun, root: int, stats: dict) -> list[dict]:
    """CPU seconds of each server process over the timed run, with its role (main, LitServe's
    manager and HTTP process, forked from main; the spawned engine workers, by /stats pid)."""
    from soak_processes import server_processes

    workers = {w["pid"]: w for w in stats.get("workers", []) if "pid" in w}
    names = {p["pid"]: p["name"] for p in server_processes(root, {pid: w["worker"] for pid, w in workers.items()})}
    out = []
    for pid, after in sorted(load.server_cpu_after.items()):
        name = names.get(pid, "descendant")
        role = ROLES.get(name, name)
        if pid in workers:
            role = f"inference worker {workers[pid]['worker']} ({workers[pid].get('device', '?')})"
        cpu = after - load.server_cpu_before.get(pid, 0.0)
        out.append({"pid": pid, "role": role, "cpu_s": cpu, "core_frac": cpu / load.elapsed})
    return out


def report(summary: dict, args) -> None:
    print(
        f"{summary['requests']} requests ({summary['failed']} failed: {summary['connection_errors']} connection, "
        f"{summary['http_errors']} HTTP or stream errors) in {summary['elapsed_s']:.2f} s, api {args.api}, "
        f"workload {args.workload or 'custom'}, concurrency {args.concurrency or 'all'}, "
        f"rate {args.rate or 'all at once'}"
    )
    print(
        f"  {summary['requests_per_s']:.2f} requests/s, {summary['output_tokens_per_s']:.1f} output tokens/s "
        f"({summary['output_tokens']} tokens; {summary['expected_output_tokens']} asked for)"
    )
    for name, unit in (("ttft_ms", "ms"), ("tpot_ms", "ms"), ("itl_ms", "ms"), ("e2e_s", "s")):
        p = summary[name]
        print(
            f"  {name.split('_')[0].upper():5s} p50 {p['p50']:8.2f} {unit}  p90 {p['p90']:8.2f} {unit}  "
            f"p99 {p['p99']:8.2f} {unit}  mean {p['mean']:8.2f} {unit}"
        )
    for error in summary["errors"]:
        print("  error:", error)
    print(
        f"load clients: {summary['client_procs']} processes ({summary['client']}), "
        f"CPU {summary['client_cpu_s']:.1f} s in {summary['elapsed_s']:.1f} s wall, "
        f"busiest process {summary['client_busiest_core_frac']:.0%} of a core"
    )
    if summary["client_may_be_limit"]:
        print(
            f"  warning: a client process used over {BUSY_CLIENT:.0%} of a core: the client may be the limit "
            "(raise --client-procs)"
        )
    if summary.get("server_cpu"):
        print(f"server processes over the timed run ({summary['elapsed_s']:.1f} s):")
        for p in summary["server_cpu"]:
            print(f"  {p['pid']} {p['role']}: {p['cpu_s']:.1f} CPU s ({p['core_frac']:.0%} of a core)")


def report_share(share: dict, summary: dict) -> None:
    print(
        f"through HTTP: {summary['output_tokens_per_s']:,.0f} out tok/s = {share['output_tok_s']:.0%} of the "
        f"engine alone ({share['engine_output_tok_s']:,.0f} out tok/s); TTFT p50 {summary['ttft_ms']['p50']:.0f} ms "
        f"vs {share['engine_ttft_p50_ms']:.0f} ms ({share['ttft_p50_ratio']:.1f}x)"
    )
    if not share["same_workload"]:
        print("  warning: the engine baseline ran another workload (output tokens, vocabulary or seed differ)")


def one_run(args, model_dir: Path | None, tmp: Path, devices: int | None, baseline: dict | None = None) -> dict:
    """Start a server (unless --url), run the workload, stop it; print and return the figures."""
    proc, url, server_cpu = None, args.url, None
    if model_dir is not None:
        where = f"{devices} GPU(s)" if devices else args.device
        print(f"starting astrai-serve on {model_dir} ({where}) ...", flush=True)
        proc, url = start_server(args, model_dir, tmp / f"server-{devices or args.device}.log", devices)
    try:
        load = send_load(args, url, proc.pid if proc else None)
        if proc is not None:
            stats = httpx.get(url + "/stats", headers=auth_headers(args), timeout=30).json()  # /stats needs the key too
            engine = stats["engine"]
            per_engine = [w.get("stats", {}).get("generated_tokens") for w in stats.get("workers", [])]
            print(
                f"engines: {stats.get('engines', 1)}, {engine['steps']} steps, {engine['generated_tokens']} tokens "
                f"generated (per engine: {per_engine}), {engine['preemptions']} preemptions"
            )
            server_cpu = server_cpu_figures(load, proc.pid, stats)
    finally:
        if proc is not None:
            stop_server(proc)
    summary = summarize(load.results, load.elapsed)
    summary.update(
        client_figures(args, load),
        devices=devices,
        workload=args.workload,
        seed=args.seed,
        vocab_size=args.vocab_size,
        max_batch_size=args.max_batch_size,
        max_num_batched_tokens=args.max_num_batched_tokens,
        expected_output_tokens=sum(body["max_tokens"] for _, body, _ in build_requests(args, args.seed)),
        server_cpu=server_cpu,
    )
    report(summary, args)
    if baseline is not None:
        summary["engine_baseline"], summary["share"] = baseline, share_of_engine(summary, baseline)
        report_share(summary["share"], summary)
    if args.json:
        print(json.dumps(summary))
    return summary


def compare(runs: list[dict]) -> None:
    base = runs[0]
    print(f"\nthroughput against {base['devices']} GPU(s) ({base['output_tokens_per_s']:.1f} output tokens/s):")
    for run in runs[1:]:
        ratio = (
            run["output_tokens_per_s"] / base["output_tokens_per_s"] if base["output_tokens_per_s"] else float("nan")
        )
        per_gpu = ratio * base["devices"] / run["devices"]
        print(
            f"  {run['devices']} GPU(s): {run['output_tokens_per_s']:.1f} output tokens/s = {ratio:.2f}x "
            f"({per_gpu:.0%} of linear), TTFT p50 {run['ttft_ms']['p50']:.1f} ms vs {base['ttft_ms']['p50']:.1f} ms"
        )


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, baseline = None, None
        if args.model:
            model_dir = prepare_model(args.model, Path(tmp))
            args.vocab_size = served_vocab_size(model_dir)
            args.max_num_batched_tokens = server_budget(args)
            if args.engine_baseline:
                baseline = engine_baseline(args, model_dir)
        elif args.vocab_size is None:
            args.vocab_size = 256
        runs = []
        for devices in args.devices or [None]:
            if len(args.devices or []) > 1:
                print(f"\n== --devices {devices} ==", flush=True)
            runs.append(one_run(args, model_dir, Path(tmp), devices, baseline))
    if len(runs) > 1:
        compare(runs)


if __name__ == "__main__":
    main()
