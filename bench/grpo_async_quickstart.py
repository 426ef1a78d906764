"""Does asynchronous GRPO learn as well as synchronous GRPO, in no more wall-clock time? On the
CPU quickstart task (stage 6 of astrai-quickstart: sums the model was never asked, 8 replies per
prompt, exact-match reward, KL towards the DPO model).

    uv run python bench/grpo_async_quickstart.py --threads 2 --runs sync async-1 async-2
    uv run python bench/grpo_async_quickstart.py --prepared runs/quickstart --runs async-1 sync async-1 sync

Stages 1-5 of the quickstart run once (or --prepared names a quickstart output directory that
has dpo/export); then configs/quickstart/grpo.yaml runs from the same DPO model once
synchronously (``sync``) or with ``model.asynchronous=true, max_staleness=K`` (``async-K``: the
rollouts of later batches are generated in a background thread while the trainer trains), in
the order --runs gives (alternate them on a shared machine: its load drifts). For each run:
the wall-clock of the GRPO fit, and the held-out measures of the quickstart: mean reward of 16
sampled replies to each of the 100 held-out questions, and greedy accuracy. Each async run's
reward is compared with the first synchronous run's per question (difference +- paired standard
error); the same run twice gives the same reward, so a repeat measures only the time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from astrai.train.quickstart.chain import Quickstart, _parser
from astrai.train.quickstart.corpus import load_questions
from astrai.train.quickstart.measures import greedy_answers, paired_change, sampled_rewards
from astrai.train.rewards import load_rewards


def prepare(args: argparse.Namespace) -> Quickstart:
    """The quickstart up to DPO (or an existing output directory with dpo/export)."""
    argv = ["--out", args.prepared or args.out, "--seed", str(args.seed), "--quiet"]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    q = Quickstart(_parser().parse_args(argv))
    if args.prepared:
        from astrai.train.quickstart.corpus import write_corpus

        q.files = write_corpus(q.data, seed=q.seed, n_docs=q.docs)  # same seed: the same files again
        return q
    q.make_data()
    q.train_tokenizer()
    q.pretrain()
    q.sft()
    q.dpo()
    return q


def grpo_run(q: Quickstart, name: str, out: Path, extra: dict) -> dict:
    overrides = q.stage_overrides("grpo", {"train": q.files["grpo_train"], "val": q.files["grpo_val"]})
    overrides.update(
        {
            "trainer.default_root_dir": out / name,
            "model.export.dir": out / name / "export",
            "model.model": q.export("dpo"),
            "trainer.limit_val_batches": 0,
            "trainer.logger": False,
            **extra,
        }
    )
    start = time.perf_counter()
    metrics = q.cli("fit", "grpo", overrides)
    seconds = time.perf_counter() - start
    return {"name": name, "seconds": seconds, "export": out / name / "export", "train": metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/grpo_async_bench")
    parser.add_argument("--prepared", default=None, help="a quickstart output directory with dpo/export")
    parser.add_argument("--runs", nargs="+", default=["sync", "async-1"], help="sync or async-K, in order")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    out = Path(args.out).resolve()
    start = time.perf_counter()
    q = prepare(args)
    print(f"prepared the DPO model in {time.perf_counter() - start:.0f} s: {q.export('dpo')}", flush=True)
    config = yaml.safe_load((q.configs / "grpo.yaml").read_text(encoding="utf-8"))["model"]["init_args"]
    rewards = load_rewards(config["rewards"], "grpo.yaml: model.rewards")
    questions = load_questions(q.files["sft_heldout"])
    runs = []
    for i, name in enumerate(args.runs):
        if name == "sync":
            extra = {}
        elif name.startswith("async-") and name[6:].isdigit():
            extra = {"model.asynchronous": True, "model.max_staleness": int(name[6:])}
        else:
            parser.error(f"--runs: {name!r} is neither sync nor async-K")
        runs.append(grpo_run(q, name, out / f"run{i}", extra))
    baseline = next((r for r in runs if r["name"] == "sync"), runs[0])
    sampling = dict(samples=16, temperature=1.0, max_tokens=config.get("max_new_tokens", 24), seed=args.seed)
    for run in runs:
        run["reward"] = sampled_rewards(run["export"], questions, rewards, **sampling)
        run["accuracy"], _ = greedy_answers(run["export"], questions)
    before = sampled_rewards(q.export("dpo"), questions, rewards, **sampling)
    rows = []
    print(f"\n{'run':10s} {'GRPO fit s':>10s} {'reward':>7s} {'vs DPO':>16s} {'vs sync':>16s} {'accuracy':>8s}")
    for run in runs:
        gain = paired_change(before, run["reward"])
        versus = paired_change(baseline["reward"], run["reward"])
        accuracy = sum(run["accuracy"]) / len(run["accuracy"])
        print(
            f"{run['name']:10s} {run['seconds']:10.1f} {gain.after:7.3f} {gain.delta:+8.3f} +-{gain.stderr:.3f} "
            f"{versus.delta:+8.3f} +-{versus.stderr:.3f} {accuracy:8.3f}"
        )
        rows.append(
            {
                "run": run["name"],
                "fit_seconds": round(run["seconds"], 1),
                "reward": gain.after,
                "reward_before": gain.before,
                "reward_vs_sync": versus.delta,
                "reward_vs_sync_stderr": versus.stderr,
                "accuracy": accuracy,
                "stale_dropped": run["train"].get("train/stale_dropped"),
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    print(f"\nresults: {out / 'results.json'}")


if __name__ == "__main__":
    main()
