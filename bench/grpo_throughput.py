"""GRPO steps per hour on one device: our GRPOModule synchronous and asynchronous, and TRL's
GRPOTrainer, on the same model, prompts, reward and settings, in one run (issue 21, part 5).

    uv run python bench/grpo_throughput.py                                 # tiny model, CPU
    python3 bench/grpo_throughput.py --model configs/model/qwen2.5-0.5b.json --device cuda \\
        --runs sync async-1 async-2 trl rollout

The ``rollout`` run generates the same steps' prompts with the same module's engine (settings,
dtype, seeded sampling) and trains nothing: against ``sync``'s rollout tokens/s, it shows what
generating inside the training process costs.

Every run is its own subprocess (a clean device, its own peak memory), on a real Lightning fit
(``--worker``, below) or on TRL (bench/grpo_trl.py: TRL without vLLM generates with
transformers ``generate``, which is what its GRPOTrainer does out of the box). The task is
bench/grpo_task.py's sums with a random-weight model. Every completion runs to max-new-tokens
(ours with ignore_eos; TRL's because transformers practically never draws EOS from the
151,936-row vocabulary), so each step generates and trains on the same number of tokens in
every framework (``completion_tokens_per_step`` shows it).

Per run, over the steps after the warm-up: steps/hour; rollout tokens/s (generated tokens over
the time spent generating); the trainer's tokens/s and MFU (prompt + completion tokens trained
on, over the step time the trainer did not spend waiting for rollouts, counted at 6 x params
FLOPs a token plus attention: the policy's extra forward for the old log-probs is not counted);
the share of the step the trainer waited for rollouts (synchronous: all of generation;
asynchronous: only what the background generation had not finished); weight-sync seconds; peak
device memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
# The rollout engine's counts a run records: whether its steps overlapped the host's work, were
# preempted or ran as many steps as the tokens need (where its speed goes).
ENGINE_STATS = (
    "steps",
    "overlapped_steps",
    "grouped_steps",
    "preemptions",
    "computed_tokens",
    "generated_tokens",
    "pages_total",
)
sys.path.insert(0, str(BENCH))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="configs/model/tiny.json", help="model directory or ModelConfig JSON")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--runs", nargs="+", default=["sync", "async-1"], help="sync, async-K (max_staleness K), trl, rollout"
    )
    p.add_argument("--steps", type=int, default=None, help="measured optimizer steps (default 5 GPU, 2 CPU)")
    p.add_argument("--warmup", type=int, default=2, help="steps before measuring (compile, CUDA graphs)")
    p.add_argument("--trl-steps", type=int, default=None, help="TRL's measured steps (default: --steps)")
    p.add_argument("--prompts-per-step", type=int, default=None, help="default 64 GPU, 4 CPU")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 256 GPU, 16 CPU")
    p.add_argument("--micro-batch-size", type=int, default=None, help="completions a forward/backward (16 GPU, 8 CPU)")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA")
    p.add_argument(
        "--scheduler-steps",
        type=int,
        default=None,
        help="our rollout engine's num_scheduler_steps (decode steps per scheduling; default: the rollout engine's, 8)",
    )
    p.add_argument(
        "--compile-mode",
        default="default",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        help="our runs' model.compile_mode (reduce-overhead: the trainer's forward and backward as CUDA graphs)",
    )
    p.add_argument("--param-dtype", default=None, help="float32 or bfloat16 (default: bfloat16 on CUDA)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--output", default=None, help="also write every run's record to this JSON file")
    p.add_argument("--run-timeout", type=float, default=None, help="seconds a run may take before it is stopped")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one of ours
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    gpu = args.device != "cpu"
    args.steps = args.steps or (5 if gpu else 2)
    args.prompts_per_step = args.prompts_per_step or (64 if gpu else 4)
    args.max_new_tokens = args.max_new_tokens or (256 if gpu else 16)
    args.micro_batch_size = args.micro_batch_size or (16 if gpu else 8)
    args.compile = gpu if args.compile is None else args.compile
    args.param_dtype = args.param_dtype or ("bfloat16" if gpu else "float32")
    return args


# ---- our GRPO, one run per process --------------------------------------------------------------


class _Clock:
    """Seconds spent in a function, summed, and what it returned (wrapped around the rollout
    backend's generate/sync and the producer's take: measurement only)."""

    def __init__(self):
        self.seconds, self.calls, self.tokens = 0.0, 0, 0

    def wrap(self, owner, name: str, count_tokens: bool = False):
        original = getattr(owner, name)

        def timed(*a, **kw):
            start = time.perf_counter()
            out = original(*a, **kw)
            self.seconds += time.perf_counter() - start
            self.calls += 1
            if count_tokens:
                self.tokens += out.num_tokens
            return out

        setattr(owner, name, timed)
        return self


def prompt_batches(args: argparse.Namespace):
    """The bench's prompts, args.prompts_per_step a batch (the same in every run of ours)."""
    from astrai.train.data.grpo import GRPODataModule

    return GRPODataModule(
        tokenizer=args.model,
        train=args.data,
        batch_size=args.prompts_per_step,
        max_prompt_len=64,
        cache_dir=str(Path(args.result).parent / "cache"),
    )


def run_ours(args: argparse.Namespace) -> dict:
    import lightning as L
    import torch

    from astrai.train import grpo_async
    from astrai.train.grpo_module import GRPOModule
    from astrai.train.metrics import flops_per_token, mfu
    from astrai.train.rollout import RolloutEngine

    mode = args.worker
    staleness = int(mode.split("-")[1]) if mode.startswith("async-") else 0
    generate = _Clock().wrap(RolloutEngine, "generate", count_tokens=True)
    sync = _Clock().wrap(RolloutEngine, "sync")
    wait = _Clock().wrap(grpo_async.RolloutProducer, "take")
    cuda = args.device.startswith("cuda")
    module = GRPOModule(
        model=args.model,
        rewards=[{"fn": "astrai.train.rewards.answer_match"}],
        group_size=args.group_size,
        max_new_tokens=args.max_new_tokens,
        temperature=1.0,
        kl_coef=0.0,
        micro_batch_size=args.micro_batch_size,
        optimizer={"lr": args.lr, "weight_decay": 0.0},
        schedule={"name": "constant"},
        engine={
            "max_batch_size": min(512, args.prompts_per_step * args.group_size),
            "num_scheduler_steps": args.scheduler_steps,
        },
        asynchronous=staleness > 0,
        max_staleness=max(staleness, 1),
        compile=args.compile,
        compile_mode=args.compile_mode if args.compile else "default",
        param_dtype=args.param_dtype,
        export={"on_fit_end": False},
    )
    # Our engine draws only tokens the tokenizer can decode (1,024 here, of the 151,936 rows of
    # the Qwen2.5 embedding), so a random model ends about a third of its replies early with
    # EOS, where transformers, drawing from every row, practically never does: without this,
    # our runs would generate and train on fewer tokens than TRL's (they did on an H100).
    module.sampling = dataclasses.replace(module.sampling, ignore_eos=True)
    trained: list[int] = []
    log_throughput = module.log_throughput

    def count_trained(tokens, seq_len):
        trained.append(tokens)
        return log_throughput(tokens, seq_len)

    module.log_throughput = count_trained
    if mode == "rollout":
        return rollout_only(args, module, cuda)
    data = prompt_batches(args)
    steps: list[dict] = []
    fill = staleness  # batches the asynchronous pipeline takes before its first optimizer step

    class StepClock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()
            self.before = (generate.seconds, generate.tokens, sync.seconds, wait.seconds, len(trained))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if cuda:
                torch.cuda.synchronize()
            gen_s, gen_tok, sync_s, wait_s, n_trained = self.before
            record = {
                "batch": batch_idx,
                "seconds": time.perf_counter() - self.start,
                "generate_seconds": generate.seconds - gen_s,
                "completion_tokens": generate.tokens - gen_tok,
                "sync_seconds": sync.seconds - sync_s,
                # synchronous: the trainer generates; asynchronous: it waits in take()
                "wait_seconds": (wait.seconds - wait_s) if staleness else (generate.seconds - gen_s),
                "trained_tokens": sum(trained[n_trained:]),
            }
            steps.append(record)

    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        precision="bf16-mixed" if cuda else "32-true",
        max_steps=args.warmup + args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[StepClock()],
        enable_progress_bar=False,
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, datamodule=data)
    measured = [s for s in steps if s["batch"] >= fill + args.warmup][: args.steps]
    engine = getattr(module._rollout, "engine", None)
    engine_stats = {k: engine.stats()[k] for k in ENGINE_STATS} if engine is not None else None
    seq_len = args.max_new_tokens + 64
    per_token = flops_per_token(module.model, module.config, seq_len)
    peak = module._peak_flops
    for s in measured:
        train_seconds = max(s["seconds"] - s["wait_seconds"], 1e-9)
        s["trainer_tokens_per_sec"] = s["trained_tokens"] / train_seconds
        s["trainer_mfu"] = mfu(s["trainer_tokens_per_sec"], per_token, peak)
    return {
        "framework": "astrai",
        "run": mode,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "steps": measured,
        "warmup_seconds": [s["seconds"] for s in steps if s["batch"] < fill + args.warmup],
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "rollout_engine": engine_stats,
        "weight_sync_seconds": statistics.median([s["sync_seconds"] for s in measured]) if measured else None,
        "settings": {
            "compile": args.compile,
            "compile_mode": args.compile_mode if args.compile else None,
            "param_dtype": args.param_dtype,
            "precision": str(trainer.precision),
            "max_staleness": staleness,
            "old_logps": module.old_logps_source,
            "micro_batch_size": args.micro_batch_size,
            "num_scheduler_steps": engine.core.num_scheduler_steps if engine is not None else None,
        },
    }


def rollout_only(args: argparse.Namespace, module, cuda: bool) -> dict:
    """The sync run's rollouts without its trainer: the module's engine (built as in training)
    generates each step's prompts, seeded as in training; nothing trains in between."""
    import torch

    module.to(torch.device(args.device))
    data = prompt_batches(args)
    data.setup("fit")
    engine = module.rollout_engine()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    steps = []
    for i, batch in zip(range(args.warmup + args.steps), data.train_dataloader()):
        start = time.perf_counter()
        out = engine.generate(batch["prompt_ids"], module.sampling, module._seeds(batch, i))
        seconds = time.perf_counter() - start
        steps.append({"batch": i, "seconds": seconds, "generate_seconds": seconds, "completion_tokens": out.num_tokens})
    return {
        "framework": "astrai",
        "run": "rollout",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "steps": steps[args.warmup :],
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "rollout_engine": {k: engine.engine.stats()[k] for k in ENGINE_STATS},
    }


# ---- the orchestrator ----------------------------------------------------------------------------


def summarise(record: dict) -> dict:
    steps = record["steps"]
    if not steps:
        return {"run": record.get("run", record["framework"]), "error": "no measured step"}
    seconds = statistics.mean(s["seconds"] for s in steps)
    gen = sum(s["generate_seconds"] for s in steps)
    wait = sum(s.get("wait_seconds", s["generate_seconds"]) for s in steps)
    out = {
        "run": record.get("run", record["framework"]),
        "step_s": seconds,
        "steps_per_hour": 3600 / seconds,
        "rollout_tok_s": sum(s["completion_tokens"] for s in steps) / max(gen, 1e-9),
        "completion_tokens_per_step": statistics.mean(s["completion_tokens"] for s in steps),
        "wait_share": wait / sum(s["seconds"] for s in steps),
        "weight_sync_s": record.get("weight_sync_seconds"),
        "peak_gib": record.get("peak_memory_gib"),
    }
    if "trained_tokens" not in steps[0]:
        return out  # the rollout run: nothing trained
    if "trainer_tokens_per_sec" in steps[0]:
        out["trainer_tok_s"] = statistics.mean(s["trainer_tokens_per_sec"] for s in steps)
        mfus = [s["trainer_mfu"] for s in steps if s.get("trainer_mfu") is not None]
        out["trainer_mfu"] = statistics.mean(mfus) if mfus else None
    else:  # TRL: its step minus its generate
        train = sum(s["seconds"] - s["generate_seconds"] for s in steps)
        out["trainer_tok_s"] = sum(s["trained_tokens"] for s in steps) / max(train, 1e-9)
    return out


def launch(args, run: str, model_dir: Path, data: Path, workdir: Path) -> dict:
    result = workdir / f"{run}.json"
    if run == "trl":
        cmd = [sys.executable, str(BENCH / "grpo_trl.py"), "--out", str(result)]
        steps = args.trl_steps or args.steps
        cmd += ["--steps", str(steps), "--warmup", "1"]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", run, "--result", str(result)]
        cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
        cmd += ["--compile" if args.compile else "--no-compile", "--param-dtype", args.param_dtype]
        cmd += ["--compile-mode", args.compile_mode]
        if args.scheduler_steps is not None:
            cmd += ["--scheduler-steps", str(args.scheduler_steps)]
    cmd += ["--model", str(model_dir), "--data", str(data), "--device", args.device, "--lr", str(args.lr)]
    cmd += ["--prompts-per-step", str(args.prompts_per_step), "--group-size", str(args.group_size)]
    cmd += ["--max-new-tokens", str(args.max_new_tokens), "--micro-batch-size", str(args.micro_batch_size)]
    start = time.perf_counter()
    try:
        done = subprocess.run(
            cmd, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=args.run_timeout
        ).returncode
    except subprocess.TimeoutExpired:
        done = f"timed out after {args.run_timeout} s"
    if done != 0 or not result.exists():
        return {"framework": run, "run": run, "steps": [], "error": f"exit {done}"}
    record = json.loads(result.read_text())
    record["wall_seconds"] = time.perf_counter() - start
    print(f"{run}: {json.dumps(summarise(record))}", flush=True)
    return record


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        record = run_ours(args)
        Path(args.result).write_text(json.dumps(record, indent=1))
        return
    from grpo_task import write_prompts
    from serve_load import prepare_model

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="grpo_bench_"))
    model_dir = prepare_model(args.model, workdir)
    total_steps = args.warmup + args.steps + 2  # + the asynchronous pipeline's fill
    data = write_prompts(workdir / "prompts.jsonl", args.prompts_per_step * total_steps)
    records, rows = [], []
    for run in args.runs:  # each run's row printed as it ends: a run cut short later leaves it
        records.append(launch(args, run, model_dir, data, workdir))
        r = records[-1]
        rows.append(summarise(r) if r["steps"] else {"run": r["run"], "error": r.get("error")})
        print(f"finished: {json.dumps(rows[-1])}", flush=True)
    print(json.dumps(rows, indent=1))
    rates = {r["run"]: r["steps_per_hour"] for r in rows if "steps_per_hour" in r and r["run"] != "rollout"}
    alone = {r["run"]: r["rollout_tok_s"] for r in rows if "rollout_tok_s" in r}
    if "rollout" in alone and "sync" in alone:
        print(
            f"rollouts: {alone['sync']:,.0f} tok/s inside the sync run, {alone['rollout']:,.0f} alone "
            f"({alone['sync'] / alone['rollout']:.2f}x)"
        )
    for name, rate in rates.items():
        ratios = [f"{rate / rates[ref]:.2f}x {ref}" for ref in ("trl", "sync") if ref in rates and ref != name]
        print(f"{name}: {rate:.0f} steps/hour" + (f" = {', '.join(ratios)}" if ratios else ""))
    if args.output:
        Path(args.output).write_text(json.dumps({"args": vars(args), "runs": records, "summary": rows}, indent=1))


if __name__ == "__main__":
    main()
