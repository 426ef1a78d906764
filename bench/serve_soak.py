"""Soak test of astrai-serve: minutes of mixed traffic, one killed worker, then a leak check.

    uv run python bench/serve_soak.py --model configs/model/tiny.json --minutes 1.5
    uv run python bench/serve_soak.py --model configs/model/tiny.json --minutes 10 --clients 16 --json soak.json
    uv run python bench/serve_soak.py --model runs/sft-lora/export --device cuda --workers 1 --minutes 30

Starts a real `astrai-serve` on 127.0.0.1 (a model directory, or a ModelConfig JSON for which
random weights and a small tokenizer are made, as bench/serve_load.py does) and for --minutes
drives it from --clients asyncio clients. Each client loops over random requests, one at a time:

  ok traffic   streaming and non-streaming chat completions, completions and Anthropic messages,
               through the official `openai` and `anthropic` clients and through raw httpx;
  disconnects  streams closed after a few chunks (openai, anthropic, httpx) and request tasks
               cancelled at a random moment (the client's connection goes away mid-request);
  bad requests an unknown field (through the official clients), a lone surrogate in JSON text
               ("h\\ud800i"), a body over --max-request-bytes (with and without Content-Length)
               and invalid JSON: each must get a 4xx.

Halfway through, ten long requests (at_kill_*: openai, anthropic and httpx, streaming or not)
are sent and, once a worker holds several requests, that engine worker is killed with SIGKILL
(its pid from GET /stats, checked to be a child of the server); the server must end the dead
worker's requests with a 503 (an SSE error event in a stream) and start a new worker by itself.
/health is watched until it serves again.

Expected failures: a 4xx for a bad request; a 503 / SSE error event naming the dead worker, or a
connection error, ending within --kill-window seconds after the kill. Unexpected: anything else
(a 500, a stream cut without its end marker, a request over --request-timeout, a connection
error outside the kill window, a bad request that is not refused with a 4xx).

At the end, once the server is idle: KV pages still held. An engine's `pages_used` counts pages
referenced by a sequence; pages the prefix cache keeps for reuse after their requests ended are
counted as free (`pages_free` includes them, `pages_cached` counts every cached page, held or
not), so with no request left `pages_used` is the number of leaked pages and must be 0.
Also the RSS (VmRSS) of every server process (main, LitServe's manager, the HTTP process, each
worker) at start, just before the kill and at the end, and p50/p99 latency of successful
requests before and after the kill. Prints a table; --json PATH writes the figures. Exit status 1
on any unexpected failure, leaked page, a worker not replaced, or a server that died.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import percentiles, prepare_model, start_server, stop_server
from soak_processes import is_descendant, server_processes
from soak_traffic import AT_KILL, KINDS, Record, Traffic, classify


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory or ModelConfig JSON (random weights)")
    p.add_argument("--minutes", type=float, default=2.0, help="how long to send traffic (default: %(default)s)")
    p.add_argument("--clients", type=int, default=8, help="concurrent asyncio clients (default: %(default)s)")
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="server --workers: engine workers; one of them is killed (default: %(default)s)",
    )
    p.add_argument("--device", default="cpu", help="server --device (default: %(default)s)")
    p.add_argument("--dtype", default="auto", help="server --dtype (default: %(default)s)")
    p.add_argument("--max-batch-size", type=int, default=32, help="server --max-batch-size (default: %(default)s)")
    p.add_argument(
        "--max-request-bytes",
        default="64KiB",
        help="server --max-request-bytes; the oversized bodies exceed it (default: %(default)s)",
    )
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra astrai-serve argument (repeatable, e.g. --server-arg=--log-level=info)",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        nargs=2,
        default=[4, 48],
        metavar=("MIN", "MAX"),
        help="max_tokens of ordinary requests (disconnects ask for 4x as many, ignoring EOS)",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=60.0,
        help="a request still unanswered after this many seconds is a hang (default: %(default)s)",
    )
    p.add_argument(
        "--kill-window",
        type=float,
        default=2.0,
        help="seconds after the kill in which 503s and connection errors are expected",
    )
    p.add_argument("--no-kill", action="store_true", help="do not kill a worker (a baseline soak)")
    p.add_argument(
        "--recovery-timeout",
        type=float,
        default=180.0,
        help="seconds the replacement worker may take to serve (default: %(default)s)",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=30.0,
        help="seconds the server may take to hold no request after the traffic (default: %(default)s)",
    )
    p.add_argument("--max-requests", type=int, default=100_000, help="cap on requests per client")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON here")
    p.add_argument("--server-log", metavar="PATH", help="keep a copy of the server's log here")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.clients < 1 or args.workers < 1:
        p.error("--minutes must be positive, --clients and --workers at least 1")
    return args


# -- the run -------------------------------------------------------------------------------------
async def get_stats(http: httpx.AsyncClient, url: str) -> dict:
    return (await http.get(url + "/stats", timeout=30)).json()


async def kill_one_worker(args, traffic: Traffic, root: int, start: float, deadline: float, out: dict) -> None:
    """Halfway through: send the AT_KILL requests, SIGKILL the busiest worker as soon as it holds
    some of them, then watch /health until it serves again. A failure here goes in out["error"]."""
    targets: list[asyncio.Task] = []
    try:
        await _kill_one_worker(args, traffic, root, start, deadline, out, targets)
    except Exception as e:  # noqa: BLE001 - reported as a failure of the soak, the traffic goes on
        out["error"] = f"{type(e).__name__}: {e}"
        print("kill -9 of a worker failed:", out["error"], flush=True)
    await asyncio.gather(*targets)  # each ends within --request-timeout


async def _kill_one_worker(
    args, traffic: Traffic, root: int, start: float, deadline: float, out: dict, targets: list[asyncio.Task]
) -> None:
    url = traffic.url
    await asyncio.sleep(max(0.0, start + (deadline - start) / 2 - time.monotonic()))
    async with httpx.AsyncClient() as http:
        stats = await get_stats(http, url)
        out["rss_before_kill"] = server_processes(root, {w["pid"]: w["worker"] for w in stats["workers"] if "pid" in w})
        rng = random.Random(args.seed - 1)

        async def send(kind: str) -> None:
            traffic.records.append(await traffic.one(kind, rng))

        targets += [asyncio.create_task(send(kind)) for kind in AT_KILL for _ in range(2)]
        for _ in range(100):  # up to ~10 s until a worker holds a few requests (those, or others)
            stats = await get_stats(http, url)
            if max(w.get("stats", {}).get("active_requests", 0) for w in stats["workers"]) >= 4:
                break
            await asyncio.sleep(0.1)
        victim = max(stats["workers"], key=lambda w: w.get("stats", {}).get("active_requests", -1))
        pid = victim["pid"]
        if not is_descendant(pid, root):
            raise RuntimeError(f"worker pid {pid} from /stats is not a child of the server {root}: not killing it")
        out.update(worker=victim["worker"], pid=pid, active_requests=victim["stats"]["active_requests"])
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        out["t"] = killed
        out["at_s"] = round(killed - start, 2)
        print(
            f"[{killed - start:6.1f} s] kill -9 worker {victim['worker']} (pid {pid}, "
            f"{out['active_requests']} active requests)",
            flush=True,
        )
        seen_503 = None
        while time.monotonic() - killed < args.recovery_timeout:
            try:
                code = (await http.get(url + "/health", timeout=5)).status_code
            except httpx.HTTPError:
                code = None
            now = time.monotonic()
            if code == 503 and seen_503 is None:
                seen_503 = out["health_503_after_s"] = round(now - killed, 3)
            if code == 200 and seen_503 is not None:
                out["recovered_after_s"] = round(now - killed, 2)
                out["recovered_t"] = now
                break
            if code == 200 and seen_503 is None and now - killed > 3:
                out["recovered_after_s"] = None
                out["note"] = "/health never answered 503 after the kill"
                break
            await asyncio.sleep(0.05)
        if out.get("recovered_t"):
            stats = await get_stats(http, url)
            out["new_pid"] = stats["workers"][victim["worker"]].get("pid")
            print(
                f"[{time.monotonic() - start:6.1f} s] /health 503 after {seen_503} s, 200 again after "
                f"{out['recovered_after_s']} s; worker {victim['worker']} is now pid {out['new_pid']}",
                flush=True,
            )


async def wait_idle(args, url: str) -> tuple[bool, dict]:
    """Poll /stats until every worker answers and holds no request."""
    async with httpx.AsyncClient() as http:
        stop = time.monotonic() + args.idle_timeout
        stats: dict = {}
        while time.monotonic() < stop:
            try:
                stats = await get_stats(http, url)
                workers = stats.get("workers", [])
                if workers and all(
                    "stats" in w
                    and not (w["stats"]["active_requests"] or w["stats"]["running"] or w["stats"]["waiting"])
                    for w in workers
                ):
                    await asyncio.sleep(0.5)  # then once more, so a late abort has landed
                    return True, await get_stats(http, url)
            except (httpx.HTTPError, ValueError):
                pass
            await asyncio.sleep(0.5)
        return False, stats


async def final_probe(url: str, model: str) -> str | None:
    try:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60) as oai:
            r = await oai.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=4
            )
        return None if r.choices else f"no choices: {r}"
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"


async def soak(args, url: str, root: int, model: str) -> dict:
    traffic = Traffic(args, url, model)
    start = time.monotonic()
    deadline = start + args.minutes * 60
    kill: dict = {}
    print(
        f"traffic for {args.minutes:g} min from {args.clients} clients"
        + ("" if args.no_kill else f"; kill -9 of a worker at {args.minutes * 30:.0f} s"),
        flush=True,
    )
    try:
        tasks = [asyncio.create_task(traffic.client(i, deadline)) for i in range(args.clients)]
        if not args.no_kill:
            tasks.append(asyncio.create_task(kill_one_worker(args, traffic, root, start, deadline, kill)))

        async def progress() -> None:
            while time.monotonic() < deadline:
                await asyncio.sleep(min(15.0, max(0.1, deadline - time.monotonic())))
                recs = traffic.records
                bad = sum(r.error is not None and not r.kind.startswith("bad_") for r in recs)
                print(
                    f"[{time.monotonic() - start:6.1f} s] {len(recs)} requests done, {bad} ordinary ones failed so far",
                    flush=True,
                )

        tasks.append(asyncio.create_task(progress()))
        await asyncio.gather(*tasks)
    finally:
        await traffic.aclose()
    elapsed = time.monotonic() - start
    for rec in traffic.records:
        classify(rec, kill.get("t"), args.kill_window)
    return {"records": traffic.records, "kill": kill, "elapsed": elapsed, "start": start}


def latency(recs: list[Record]) -> dict:
    """n, p50 and p99 of end - start in ms (None without requests: JSON has no NaN)."""
    if not recs:
        return {"n": 0, "p50_ms": None, "p99_ms": None}
    p = percentiles([(r.end - r.start) * 1e3 for r in recs])
    return {"n": len(recs), "p50_ms": round(p["p50"], 1), "p99_ms": round(p["p99"], 1)}


def _ms(value: float | None, width: int) -> str:
    return f"{'-':>{width}s}" if value is None else f"{value:{width}.0f}"


def summarize(
    args, result: dict, pages: dict, rss: dict, log_text: str, server_alive: bool, probe_error: str | None
) -> dict:
    recs, kill = result["records"], result["kill"]
    by_kind = {}
    for kind in [*KINDS, *AT_KILL]:
        mine = [r for r in recs if r.kind == kind]
        if kind in AT_KILL and not mine:
            continue
        ok = [r for r in mine if r.outcome == "ok"]
        # Latency: of the successful requests; for bad_* ones, of the refusals.
        timed = [r for r in mine if r.outcome == "expected"] if kind.startswith("bad_") else ok
        by_kind[kind] = {
            "requests": len(mine),
            "ok": len(ok),
            "expected_fail": sum(r.outcome == "expected" for r in mine),
            "unexpected_fail": sum(r.outcome == "unexpected" for r in mine),
            **{k: v for k, v in latency(timed).items() if k != "n"},
        }
    # Latency phases: ordinary requests only (disconnects end early, AT_KILL ones are long on purpose).
    ok = [r for r in recs if r.outcome == "ok" and not r.kind.startswith(("disconnect_", "cancel_", "at_kill_"))]
    kt, rt = kill.get("t"), kill.get("recovered_t")
    lat = {"before_kill": latency([r for r in ok if kt is None or r.end < kt])}
    if kt is not None:
        lat["after_kill"] = latency([r for r in ok if r.start >= kt])
        lat["spanning_kill"] = latency([r for r in ok if r.start < kt <= r.end])
        if rt is not None:
            lat["after_recovery"] = latency([r for r in ok if r.start >= rt])
    reasons: dict[str, int] = {}
    for r in recs:
        if r.outcome == "expected":
            key = f"{'bad request' if r.kind.startswith('bad_') else 'kill'}: {r.reason}"
            reasons[key] = reasons.get(key, 0) + 1
    unexpected = [r for r in recs if r.outcome == "unexpected"]
    told = [r.end - kt for r in recs if r.outcome == "expected" and not r.kind.startswith("bad_")]
    if told:  # how many requests the kill ended, and when the last of their clients heard of it
        kill = {**kill, "requests_ended": len(told), "last_told_after_s": round(max(told), 3)}
    log_lines = log_text.splitlines()
    flagged = [line for line in log_lines if any(w in line for w in ("Traceback", "ERROR", "Error", " 500 "))]
    leaked = sum(w["stats"]["pages_used"] for w in pages.get("workers", []) if "stats" in w)
    kill_ok = args.no_kill or kill.get("recovered_after_s") is not None
    failures = []
    if unexpected:
        failures.append(f"{len(unexpected)} unexpected failures")
    if not pages.get("idle"):
        failures.append(f"the server did not become idle within {args.idle_timeout:g} s")
    if leaked:
        failures.append(f"{leaked} KV pages still used with no request")
    if kill.get("error"):
        failures.append(f"the kill failed: {kill['error']}")
    elif not kill_ok:
        failures.append(f"the killed worker was not replaced: {kill.get('note') or '/health did not serve again'}")
    if not server_alive:
        failures.append("the server process died")
    if probe_error:
        failures.append(f"the request after the soak failed: {probe_error}")
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "server_log")},
        "elapsed_s": round(result["elapsed"], 1),
        "requests": len(recs),
        "ok": sum(r.outcome == "ok" for r in recs),
        "expected_fail": sum(r.outcome == "expected" for r in recs),
        "unexpected_fail": len(unexpected),
        "expected_by_reason": reasons,
        "by_kind": by_kind,
        "unexpected": [
            {**asdict(r), "start_s": round(r.start - result["start"], 2), "end_s": round(r.end - result["start"], 2)}
            for r in unexpected[:50]
        ],
        "latency": lat,
        "kill": {k: v for k, v in kill.items() if k not in ("t", "recovered_t", "rss_before_kill")},
        "pages": {
            "idle": pages.get("idle"),
            "leaked_pages": leaked,
            "workers": [
                {
                    "worker": w.get("worker"),
                    "pid": w.get("pid"),
                    **{
                        k: w.get("stats", {}).get(k)
                        for k in (
                            "active_requests",
                            "pages_used",
                            "pages_cached",
                            "pages_free",
                            "pages_total",
                            "preemptions",
                            "generated_tokens",
                        )
                    },
                }
                for w in pages.get("workers", [])
            ],
        },
        "rss_mib": rss,
        "server_log": {"lines": len(log_lines), "flagged": flagged[:40]},
        "failures": failures,
        "passed": not failures,
    }


def report(s: dict) -> None:
    print(
        f"\n{s['requests']} requests in {s['elapsed_s']} s: {s['ok']} ok, {s['expected_fail']} expected failures, "
        f"{s['unexpected_fail']} unexpected"
    )
    print(
        f"{'kind':32s} {'requests':>8s} {'ok':>6s} {'expected':>8s} {'unexpected':>10s} {'p50 ms':>8s} {'p99 ms':>8s}"
    )
    for kind, k in s["by_kind"].items():
        print(
            f"{kind:32s} {k['requests']:8d} {k['ok']:6d} {k['expected_fail']:8d} {k['unexpected_fail']:10d} "
            f"{_ms(k['p50_ms'], 8)} {_ms(k['p99_ms'], 8)}"
        )
    print("(p50/p99: end-to-end ms of the successful requests; for bad_* kinds, of the refusals)")
    for reason, n in s["expected_by_reason"].items():
        print(f"  expected: {n:5d} x {reason}")
    for r in s["unexpected"][:15]:
        print(f"  UNEXPECTED {r['kind']} [{r['start_s']}-{r['end_s']} s]: {r['reason']}")
    print("latency of successful ordinary requests (disconnects and at_kill_* left out):")
    for phase, p in s["latency"].items():
        print(f"  {phase:15s} n {p['n']:5d}  p50 {_ms(p['p50_ms'], 8)} ms  p99 {_ms(p['p99_ms'], 8)} ms")
    if s["kill"]:
        print("kill:", json.dumps(s["kill"]))
    pages = s["pages"]
    print(
        f"KV pages with the server idle ({'reached' if pages['idle'] else 'NOT reached'}): "
        f"{pages['leaked_pages']} used (leaked)"
    )
    for w in pages["workers"]:
        print(
            f"  worker {w['worker']} pid {w['pid']}: used {w['pages_used']}, cached {w['pages_cached']}, "
            f"free {w['pages_free']} of {w['pages_total']}; {w['preemptions']} preemptions, "
            f"{w['generated_tokens']} tokens generated"
        )
    print("RSS MiB:")
    phases = list(s["rss_mib"])
    print(f"  {'process':18s}" + "".join(f"{p:>22s}" for p in phases))
    names = []
    for procs in s["rss_mib"].values():
        names += [p["name"] for p in procs if p["name"] not in names]
    for name in names:
        cells = []
        for phase in phases:
            hit = [p for p in s["rss_mib"][phase] if p["name"] == name]
            cells.append(", ".join(f"{p['rss_mib']} (pid {p['pid']})" for p in hit) or "-")
        print(f"  {name:18s}" + "".join(f"{c:>22s}" for c in cells))
    for line in s["server_log"]["flagged"][:10]:
        print("  server log:", line[:200])
    print("PASSED" if s["passed"] else "FAILED: " + "; ".join(s["failures"]))


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = prepare_model(args.model, tmp)
        log_path = tmp / "server.log"
        server_args = argparse.Namespace(
            device=args.device,
            dtype=args.dtype,
            max_batch_size=args.max_batch_size,
            api_key=None,
            server_arg=[
                "--workers",
                str(args.workers),
                "--max-request-bytes",
                args.max_request_bytes,
                *args.server_arg,
            ],
        )
        print(f"starting astrai-serve on {model_dir} ({args.device}, {args.workers} worker(s)) ...", flush=True)
        proc, url = start_server(server_args, model_dir, log_path)
        try:
            stats = httpx.get(url + "/stats", timeout=30).json()
            model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
            pids = {w["pid"]: w["worker"] for w in stats["workers"] if "pid" in w}
            rss = {"start": server_processes(proc.pid, pids)}
            result = asyncio.run(soak(args, url, proc.pid, model))
            if "rss_before_kill" in result["kill"]:
                rss["before_kill"] = result["kill"]["rss_before_kill"]
            idle, stats = asyncio.run(wait_idle(args, url))
            pages = {"idle": idle, "workers": stats.get("workers", [])}
            pids = {w["pid"]: w["worker"] for w in pages["workers"] if "pid" in w}
            rss["end"] = server_processes(proc.pid, pids)
            probe = asyncio.run(final_probe(url, model))
            alive = proc.poll() is None
        finally:
            stop_server(proc)
            if args.server_log:
                shutil.copy(log_path, args.server_log)
        summary = summarize(args, result, pages, rss, log_path.read_text(errors="replace"), alive, probe)
    report(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1, default=str, allow_nan=False))
        print(f"figures written to {args.json}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
