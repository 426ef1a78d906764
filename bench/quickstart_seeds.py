"""The quickstart over several seeds and thread counts: mean +- spread of every measure, and
whether every stage improved in every run.

    uv run python bench/quickstart_seeds.py                       # seeds 0 1 2, 1 and 2 threads
    uv run python bench/quickstart_seeds.py --seeds 0 1 --threads 2 --steps-scale 0.5

Each run is `astrai-quickstart --seed S --threads T --out OUT/sS-tT` in its own process, one at
a time (two at once would share the cores and time each other). The table gives, per measure,
the before and after values and the change as mean +- standard deviation over the runs, and
how many runs met the stage's rule (quickstart.verdict). Exits 1 when any run missed one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def spread(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} +- {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"


def run(seed: int, threads: int, out: Path, extra: list[str]) -> dict:
    target = out / f"s{seed}-t{threads}"
    command = [
        "astrai-quickstart",
        "--seed",
        str(seed),
        "--threads",
        str(threads),
        "--out",
        str(target),
        "--quiet",
        *extra,
    ]
    t0 = time.time()
    proc = subprocess.run(command, capture_output=True, text=True)
    (out / f"s{seed}-t{threads}.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command)} failed (rc {proc.returncode}); see {out}/s{seed}-t{threads}.log")
    results = json.loads((target / "results.json").read_text(encoding="utf-8"))
    print(
        f"seed {seed}, {threads} thread(s): {time.time() - t0:.0f} s, "
        + ", ".join(f"{k} {v}" for k, v in results["verdicts"].items()),
        flush=True,
    )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default="runs/quickstart-seeds", help="where the runs go (default: %(default)s)")
    parser.add_argument("--steps-scale", default=None, help="passed to astrai-quickstart")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = ["--steps-scale", args.steps_scale] if args.steps_scale else []
    runs = [run(seed, threads, out, extra) for threads in args.threads for seed in args.seeds]

    print(f"\n{len(runs)} runs (seeds {args.seeds} x threads {args.threads}); mean +- standard deviation over runs\n")
    print(f"{'stage':12s} {'before':>15s} {'after':>15s} {'change':>15s}  rule        met")
    for i, row in enumerate(runs[0]["table"]):  # every run's table has the same rows, in order
        vs = [r["table"][i] for r in runs]
        met = sum(v["verdict"] in ("better", "ok") for v in vs)
        print(
            f"{row['stage']:12s} {spread([v['before'] for v in vs]):>15s} {spread([v['after'] for v in vs]):>15s} "
            f"{spread([v['after'] - v['before'] for v in vs]):>15s}  {row['rule']:10s}  {met}/{len(runs)}"
        )
    seconds = [r["seconds"] for r in runs]
    print(f"\nseconds per run: {spread(seconds)} (min {min(seconds):.0f}, max {max(seconds):.0f})")
    (out / "summary.json").write_text(json.dumps(runs, indent=2) + "\n", encoding="utf-8")
    missed = [(i, s) for i, r in enumerate(runs) for s, v in r["verdicts"].items() if v not in ("better", "ok")]
    if missed:
        print(f"missed: {missed}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
