"""Evidence for training on two GPUs: DDP and FSDP against one GPU, through `astrai-train fit`.

    python3 bench/train_scaling.py                        # TinyLlama shape, bf16-mixed, 2 GPUs (~6 min on H100s)
    python3 bench/train_scaling.py --accelerator cpu --mini   # the same runs in miniature: gloo, tiny model

Every run is the real CLI (`python -m astrai.train.cli fit`) with PretrainDataModule over a
generated corpus (pseudo-words with a Zipf distribution and a usual successor per word, so
there is something to learn) and a byte-level BPE tokenizer trained on it (32,000 tokens: the
TinyLlama vocabulary size). All runs start from the same seed, so the same weights, and walk
the same shuffled windows; the learning-rate schedule has a fixed length (steps + extra steps).
No gradient clipping (CausalLMModule clips under FSDP too, but these runs compare plain steps).

  one      1 device,  batch B      STEPS + EXTRA steps   the reference loss curve
  half     1 device,  batch B/2    STEPS steps           the throughput baseline (see below)
  ddp      2 devices, B/2 each     STEPS steps           global batch B: must follow `one`
  fsdp     2 devices, B/2 each     STEPS steps           the same with FSDP (one unit per block,
                                                         full state dict), checkpoint + export
  resume   1 device,  batch B      STEPS -> STEPS+EXTRA  fsdp's last.ckpt continued on one device:
                                                         must follow `one` over the extra steps
  serve    fsdp's export under astrai-serve (--devices 2 on GPUs): one chat completion

What is printed:
- loss: per step, each run's train/loss; the largest |difference| from `one` over the steps the
  runs share. `half` sees other data (half the batch), so its difference from `one` is the scale
  of a real mismatch (e.g. two ranks reading the same windows); with bf16-mixed, ddp and fsdp
  should stay well below it (summation order and bf16 rounding only). Lightning's FSDP
  "bf16-mixed" also keeps parameters, gradient reduction and buffers in bf16 (DDP: float32
  weights under autocast, float32 all-reduce), so fsdp is expected a little further off than ddp.
- throughput: tokens/s of every run, timed after --warmup steps with the devices synchronised,
  data loading included. Scaling efficiency = tok/s(2 GPUs) / (2 x tok/s(1 GPU)) at the same
  per-device batch, i.e. ddp or fsdp against `half` (B/2 on one GPU): 1.0 is perfect, what is
  lost is communication and its waits. `one` over `half` shows what a doubled batch alone gives.
- the resumed curve against `one`, and the served reply.
A summary is printed at the end and, if $OUT is set, written to $OUT/train_scaling.json.

NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1): set here, before anything starts, and inherited by every process.
"""

from __future__ import annotations

import os

# Before torch, NCCL or anything else is loaded; every child process inherits them.
os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")

import argparse  # noqa: E402
import bisect  # noqa: E402
import csv  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import lightning as L  # noqa: E402
import torch  # noqa: E402
from serve_load import stop_server  # noqa: E402  (bench/ is on sys.path when a script of it runs)

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
TESTS_TRAIN = REPO / "tests" / "train"  # dist_helpers.CPUFSDPStrategy, for FSDP on CPU only


# -- the timer the runs load (by class path, from this module) ----------------------------------
class StepTimer(L.Callback):
    """Wall time of the optimizer steps after `warmup`, devices synchronised at both ends; rank 0
    writes {steps, seconds, tokens_per_s, ...} as JSON to `path` when training ends."""

    def __init__(self, path: str, warmup: int = 5):
        self.path, self.warmup = path, warmup
        self.start = self.end = None
        self.steps = 0
        self.tokens_per_step = 0
        self.peak_gib = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        now = time.perf_counter()
        self.tokens_per_step = batch["input_ids"].numel() * trainer.world_size
        if trainer.global_step == self.warmup:
            self.start = now
        elif trainer.global_step > self.warmup and self.start is not None:  # (a resumed run starts later)
            self.end, self.steps = now, trainer.global_step - self.warmup
        if pl_module.device.type == "cuda":
            self.peak_gib = torch.cuda.max_memory_allocated(pl_module.device) / 2**30

    def on_train_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        seconds = (self.end - self.start) if self.steps else None
        result = {
            "steps_timed": self.steps,
            "seconds": seconds,
            "world_size": trainer.world_size,
            "tokens_per_step": self.tokens_per_step,
            "tokens_per_s": self.steps * self.tokens_per_step / seconds if seconds else None,
            "peak_memory_gib_rank0": self.peak_gib,
        }
        Path(self.path).write_text(json.dumps(result))


# -- inputs ------------------------------------------------------------------------------------
def lexicon(n: int, rng: random.Random) -> list[str]:
    onsets = [
        "",
        "b",
        "d",
        "f",
        "g",
        "h",
        "k",
        "l",
        "m",
        "n",
        "p",
        "r",
        "s",
        "t",
        "v",
        "w",
        "z",
        "br",
        "dr",
        "st",
        "tr",
        "sh",
        "ch",
        "kl",
        "pl",
        "gr",
    ]
    vowels = ["a", "e", "i", "o", "u", "ai", "ou", "ee", "ia", "oa"]
    codas = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng"]
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < n:
        word = "".join(
            rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(rng.choice((1, 2, 2, 3, 3, 4)))
        )
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def documents(n_words: int, lexicon_size: int, seed: int = 0) -> list[str]:
    """Documents of 80-400 pseudo-words: Zipf-distributed, and half the time a word is followed by
    its own usual successor, which a model can learn."""
    rng = random.Random(seed)
    words = lexicon(lexicon_size, rng)
    cumulative = list(itertools.accumulate(1.0 / (r + 1) ** 1.05 for r in range(lexicon_size)))
    follower = [rng.randrange(lexicon_size) for _ in range(lexicon_size)]

    def draw() -> int:
        return bisect.bisect(cumulative, rng.random() * cumulative[-1])

    docs, total = [], 0
    while total < n_words:
        length = rng.randint(80, 400)
        w, out = draw(), []
        for i in range(length):
            out.append(words[w] + ("." if i % 12 == 11 else ""))
            w = follower[w] if rng.random() < 0.5 else draw()
        docs.append(" ".join(out).capitalize())
        total += length
    return docs


def prepare(args, work: Path) -> dict:
    from astrai.core.tokenizer_trainer import train_tokenizer

    t0 = time.perf_counter()
    docs = documents(args.words, args.lexicon)
    corpus = work / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tokenizer = train_tokenizer(
        iter(docs), vocab_size=args.vocab_size, min_frequency=2, out_dir=work / "tokenizer", show_progress=False
    )
    print(
        f"corpus: {len(docs)} documents, {args.words} words, {corpus.stat().st_size / 1e6:.1f} MB; tokenizer: "
        f"{tokenizer.vocab_size} tokens ({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    return {
        "corpus": corpus,
        "tokenizer": work / "tokenizer",
        "cache": work / "cache",
        "vocab_size": tokenizer.vocab_size,
    }


# -- runs --------------------------------------------------------------------------------------
def strategy(name: str, accelerator: str) -> str:
    if name == "ddp":
        return "ddp"
    cls = "dist_helpers.CPUFSDPStrategy" if accelerator == "cpu" else "lightning.pytorch.strategies.FSDPStrategy"
    return json.dumps(
        {
            "class_path": cls,
            "init_args": {"state_dict_type": "full", "auto_wrap_policy": ["astrai.core.transformer.Block"]},
        }
    )


def fit_args(
    args, inputs: dict, root: Path, *, steps: int, batch: int, devices: int = 1, strat: str = "auto", keep: bool = False
) -> list[str]:
    timer = {
        "class_path": "train_scaling.StepTimer",
        "init_args": {"path": str(root / "timing.json"), "warmup": args.warmup},
    }
    out = [
        "fit",
        "--model=seq",
        f"--model.model={args.model}",
        f"--model.optimizer.lr={args.lr}",
        f"--model.schedule.warmup_steps={args.lr_warmup}",
        f"--model.schedule.decay_steps={args.steps + args.extra_steps}",
        "--model.export.dtype=bfloat16" if args.accelerator != "cpu" else "--model.export.dtype=float32",
        f"--model.export.on_fit_end={str(keep).lower()}",
        "--data=pretrain",
        f"--data.train={inputs['corpus']}",
        f"--data.tokenizer={inputs['tokenizer']}",
        f"--data.seq_len={args.seq_len}",
        f"--data.batch_size={batch}",
        f"--data.cache_dir={inputs['cache']}",
        f"--data.num_workers={args.num_workers}",
        f"--data.num_proc={args.num_proc}",
        f"--trainer.accelerator={'cpu' if args.accelerator == 'cpu' else 'gpu'}",
        f"--trainer.devices={devices}",
        f"--trainer.strategy={strat}",
        f"--trainer.precision={args.precision}",
        f"--trainer.max_steps={steps}",
        f"--trainer.default_root_dir={root}",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.callbacks=[{json.dumps(timer)}]",
    ]
    if keep:
        out.append("--checkpoint.save_top_k=0")  # last.ckpt only: one full write of the optimizer state
    else:
        out.append("--trainer.enable_checkpointing=false")
    return out


def child_env(args) -> dict:
    paths = [str(BENCH)] + ([str(TESTS_TRAIN)] if args.accelerator == "cpu" else [])
    paths += [str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "TOKENIZERS_PARALLELISM": "false"}
    if args.accelerator == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    return env


def save_progress(work: Path, walls: dict) -> None:
    """What the finished runs measured so far, in $OUT/train_scaling_progress.json: if the whole
    script is cut off (a time limit), the figures of the runs that finished survive."""
    if not os.environ.get("OUT"):
        return
    runs = {
        name: {"wall_s": round(wall), "timing": timing(work / name), "losses": losses(work / name)}
        for name, wall in walls.items()
        if (work / name).is_dir()
    }
    out = Path(os.environ["OUT"]) / "train_scaling_progress.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(runs, indent=1))


def train(args, name: str, argv: list[str], log_dir: Path) -> float:
    """Run `astrai-train` with argv; its output goes to <log_dir>/<name>.log. Returns wall seconds."""
    log = log_dir / f"{name}.log"
    print(f"[{name}] astrai-train {' '.join(a for a in argv if not a.startswith('--trainer.callbacks'))}", flush=True)
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "astrai.train.cli", *argv],
            cwd=REPO,
            env=child_env(args),
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=args.run_timeout,
        )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        print(log.read_text()[-6000:], file=sys.stderr)
        raise SystemExit(f"[{name}] astrai-train failed with exit code {proc.returncode} (log: {log})")
    summary = timing(log_dir / name)
    tps = f", {summary['tokens_per_s']:,.0f} tokens/s" if summary.get("tokens_per_s") else ""
    print(f"[{name}] done in {seconds:.0f} s{tps}", flush=True)
    return seconds


def losses(root: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for path in sorted((root / "logs").glob("version_*/metrics.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    out[int(row["step"])] = float(row["train/loss"])
    return out


def timing(root: Path) -> dict:
    path = root / "timing.json"
    return json.loads(path.read_text()) if path.exists() else {}


# -- serving the FSDP export ---------------------------------------------------------------------
def serve_once(args, model_dir: Path, log_dir: Path) -> dict:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    where = ["--device", "cpu"] if args.accelerator == "cpu" else ["--devices", str(args.devices)]
    argv = [
        sys.executable,
        "-m",
        "astrai.serve.cli",
        "--model",
        str(model_dir),
        "--port",
        str(port),
        *where,
        "--max-batch-size",
        "8",
        "--log-level",
        "info",
    ]
    if args.accelerator != "cpu":
        argv += ["--kv-cache-memory", "4GiB"]
    print(f"[serve] {' '.join(argv[1:])}", flush=True)
    log = log_dir / "serve.log"
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(
            argv, cwd=REPO, env=child_env(args), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                print(log.read_text()[-6000:], file=sys.stderr)
                raise SystemExit(f"[serve] astrai-serve exited with {proc.returncode} (log: {log})")
            if time.perf_counter() - t0 > args.run_timeout:
                raise SystemExit(f"[serve] not ready after {args.run_timeout} s (log: {log})")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        ready = time.perf_counter() - t0
        body = {
            "model": model_dir.name,
            "messages": [{"role": "user", "content": "Tell me about the words."}],
            "max_tokens": 24,
            "temperature": 0,
        }
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
        r.raise_for_status()
        reply = r.json()
        stats = httpx.get(url + "/stats", timeout=30).json()
    finally:
        stop_server(proc)
    result = {
        "ready_s": round(ready, 1),
        "reply": reply["choices"][0]["message"]["content"],
        "finish_reason": reply["choices"][0]["finish_reason"],
        "usage": reply["usage"],
        "engines": [
            {"device": w.get("device"), "generated_tokens": w.get("stats", {}).get("generated_tokens")}
            for w in stats["workers"]
        ],
    }
    print(
        f"[serve] ready in {ready:.0f} s; reply ({result['finish_reason']}, "
        f"{reply['usage']['completion_tokens']} tokens): {result['reply']!r}; engines: {result['engines']}",
        flush=True,
    )
    return result


# -- comparison ----------------------------------------------------------------------------------
def max_diff(a: dict[int, float], b: dict[int, float], steps: range) -> float | None:
    shared = [s for s in steps if s in a and s in b]
    if len(shared) != len(steps):
        return None  # a run is missing steps: reported as such
    return max(abs(a[s] - b[s]) for s in shared)


def summarize(args, curves: dict, times: dict, walls: dict, served: dict | None) -> dict:
    first, rest = range(args.steps), range(args.steps, args.steps + args.extra_steps)
    one = curves["one"]
    diffs = {name: max_diff(curves[name], one, first) for name in ("half", "ddp", "fsdp")}
    diffs["resume"] = max_diff(curves["resume"], one, rest)
    step0 = {name: abs(curves[name][0] - one[0]) for name in ("ddp", "fsdp") if 0 in curves[name] and 0 in one}
    tps = {name: times[name].get("tokens_per_s") for name in times}

    def ratio(a, b, factor=1.0):
        return round(a / (factor * b), 3) if a and b else None

    return {
        "device": torch.cuda.get_device_name(0) if args.accelerator != "cpu" else "cpu",
        "model": args.model,
        "vocab_size": args.vocab_size_used,
        "seq_len": args.seq_len,
        "global_batch": args.batch_size,
        "precision": args.precision,
        "steps": args.steps,
        "extra_steps": args.extra_steps,
        "loss_drop_one": round(one[0] - one[args.steps - 1], 4) if 0 in one and args.steps - 1 in one else None,
        "max_abs_loss_diff_vs_one": diffs,
        "step0_abs_loss_diff_vs_one": step0,
        "tokens_per_s": {k: round(v) if v else None for k, v in tps.items()},
        "scaling_efficiency": {
            "ddp": ratio(tps.get("ddp"), tps.get("half"), args.devices),
            "fsdp": ratio(tps.get("fsdp"), tps.get("half"), args.devices),
        },
        "speedup_vs_one_gpu_same_global_batch": {
            "ddp": ratio(tps.get("ddp"), tps.get("one")),
            "fsdp": ratio(tps.get("fsdp"), tps.get("one")),
        },
        "peak_memory_gib_rank0": {
            k: round(t["peak_memory_gib_rank0"], 1) if t.get("peak_memory_gib_rank0") else None
            for k, t in times.items()
        },
        "wall_s": {k: round(v) for k, v in walls.items()},
        "serve": served,
        "losses": {name: [curves[name].get(s) for s in range(args.steps + args.extra_steps)] for name in curves},
    }


def print_summary(summary: dict, args) -> None:
    names = list(summary["losses"])
    print("\nstep  " + "".join(f"{n:>10}" for n in names))
    for step in range(args.steps + args.extra_steps):
        cells = [summary["losses"][n][step] for n in names]
        print(f"{step:4d}  " + "".join(f"{'':>10}" if c is None else f"{c:10.4f}" for c in cells))
    print()
    for key in (
        "device",
        "model",
        "vocab_size",
        "seq_len",
        "global_batch",
        "precision",
        "loss_drop_one",
        "max_abs_loss_diff_vs_one",
        "step0_abs_loss_diff_vs_one",
        "tokens_per_s",
        "scaling_efficiency",
        "speedup_vs_one_gpu_same_global_batch",
        "peak_memory_gib_rank0",
        "wall_s",
    ):
        print(f"{key:<38} {summary[key]}")
    if summary["serve"]:
        print(f"{'serve':<38} {summary['serve']}")


# -- main ----------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--accelerator", choices=("gpu", "cpu"), default="gpu")
    p.add_argument("--mini", action="store_true", help="tiny model and few short steps (a check of this script)")
    p.add_argument("--devices", type=int, default=2, help="devices of the distributed runs")
    p.add_argument("--model", default=None, help="ModelConfig JSON (default: TinyLlama shape; --mini: tiny.json)")
    p.add_argument("--seq-len", type=int, default=None, help="default 2048 (--mini: 64)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch B (default 8; --mini: 4)")
    p.add_argument("--steps", type=int, default=None, help="steps of the runs compared (default 24; --mini: 4)")
    p.add_argument("--extra-steps", type=int, default=None, help="steps resumed on one device (default 4; --mini: 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; --mini: 1)")
    p.add_argument("--precision", default=None, help="default bf16-mixed on GPUs, 32-true on CPU")
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--lr-warmup", type=int, default=4, help="learning-rate warm-up steps")
    p.add_argument("--vocab-size", type=int, default=None, help="tokenizer size (default 32000; --mini: 1024)")
    p.add_argument("--words", type=int, default=None, help="corpus size in words (default 1.2M; --mini: 40k)")
    p.add_argument("--lexicon", type=int, default=60000, help="distinct pseudo-words")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers per process")
    p.add_argument("--num-proc", type=int, default=4, help="processes that tokenise the corpus")
    p.add_argument("--no-serve", action="store_true", help="skip serving the FSDP export")
    p.add_argument("--work-dir", default=None, help="default: a fresh folder under /tmp")
    p.add_argument("--run-timeout", type=int, default=900, help="seconds any one run may take")
    args = p.parse_args(argv)
    mini = args.mini
    defaults = {
        "model": "configs/model/tiny.json" if mini else "configs/model/tinyllama-1.1b.json",
        "seq_len": 64 if mini else 2048,
        "batch_size": 4 if mini else 8,
        "steps": 4 if mini else 24,
        "extra_steps": 2 if mini else 4,
        "warmup": 1 if mini else 5,
        "precision": "32-true" if args.accelerator == "cpu" else "bf16-mixed",
        "vocab_size": 1024 if mini else 32000,
        "words": 40_000 if mini else 1_200_000,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if mini:
        args.lexicon = min(args.lexicon, 3000)
    if args.batch_size % args.devices:
        p.error(f"--batch-size {args.batch_size} must split evenly over --devices {args.devices}")
    if args.steps <= args.warmup:
        p.error(f"--steps {args.steps} must exceed --warmup {args.warmup} (timed steps come after the warm-up)")
    args.model = str((REPO / args.model).resolve()) if not Path(args.model).is_absolute() else args.model
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.accelerator == "gpu" and torch.cuda.device_count() < args.devices:
        raise SystemExit(f"needs {args.devices} GPUs, {torch.cuda.device_count()} visible")
    work = Path(args.work_dir) if args.work_dir else Path("/tmp") / f"astrai-train-scaling-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(
        f"work dir {work}; model {args.model}, seq {args.seq_len}, global batch {args.batch_size}, "
        f"{args.steps}+{args.extra_steps} steps, {args.precision}, {args.devices} devices "
        f"({args.accelerator}); NCCL_NVLS_ENABLE={os.environ['NCCL_NVLS_ENABLE']}",
        flush=True,
    )
    t_start = time.perf_counter()
    inputs = prepare(args, work)
    args.vocab_size_used = inputs["vocab_size"]
    B, half, total = args.batch_size, args.batch_size // args.devices, args.steps + args.extra_steps
    roots = {name: work / name for name in ("one", "half", "ddp", "fsdp")}
    walls = {}
    walls["one"] = train(args, "one", fit_args(args, inputs, roots["one"], steps=total, batch=B), work)
    save_progress(work, walls)
    walls["half"] = train(args, "half", fit_args(args, inputs, roots["half"], steps=args.steps, batch=half), work)
    save_progress(work, walls)
    for name in ("ddp", "fsdp"):
        argv = fit_args(
            args,
            inputs,
            roots[name],
            steps=args.steps,
            batch=half,
            devices=args.devices,
            strat=strategy(name, args.accelerator),
            keep=name == "fsdp",
        )
        walls[name] = train(args, name, argv, work)
        save_progress(work, walls)
    times = {name: timing(root) for name, root in roots.items()}
    # Keep fsdp's own export (the resumed run exports to the same place), then resume on one device.
    fsdp = roots["fsdp"]
    (fsdp / "export").rename(fsdp / "export-fsdp")
    (fsdp / "timing.json").unlink(missing_ok=True)
    # An explicit path: with checkpointing off (nothing more to save), "last" would not be looked up.
    resume = fit_args(args, inputs, fsdp, steps=total, batch=B) + [f"--ckpt_path={fsdp / 'checkpoints' / 'last.ckpt'}"]
    walls["resume"] = train(args, "resume", resume, work)
    curves = {name: losses(root) for name, root in roots.items()}
    all_fsdp = curves.pop("fsdp")
    curves["fsdp"] = {s: v for s, v in all_fsdp.items() if s < args.steps}
    curves["resume"] = {s: v for s, v in all_fsdp.items() if s >= args.steps}
    served = None if args.no_serve else serve_once(args, fsdp / "export-fsdp", work)
    summary = summarize(args, curves, times, walls, served)
    summary["total_s"] = round(time.perf_counter() - t_start)
    print_summary(summary, args)
    print(f"{'total_s':<38} {summary['total_s']}")
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / "train_scaling.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=1))
        print(f"summary written to {out}")
    return summary


if __name__ == "__main__":
    main()
