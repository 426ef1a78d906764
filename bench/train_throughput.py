"""Training throughput of `astrai-train`'s pre-training module: tokens/s, MFU, peak memory.

Runs PretrainModule under a real Lightning Trainer on random tokens (so data loading costs
nothing) and times the optimizer steps after a warm-up, synchronising the device only at the
two ends of the timed window. Optionally, in the same process:
  --overhead   the same PretrainModule and optimizer in a plain loop (forward, loss, backward, step,
               zero_grad, same compile and precision): Lightning's overhead = its step time /
               the plain loop's - 1.
  --reference  Hugging Face transformers' LlamaForCausalLM of the same shape (random init, bf16
               autocast, fused AdamW, torch.compile with --compile): tokens/s, memory, our ratio.
  --param-dtype float32 bfloat16   run ours once per weight dtype (module option param_dtype).
  --accumulate N   N batches per optimizer step (trainer.accumulate_grad_batches); tokens/s
               count all N, a "step" is one optimizer step (Lightning runs only).
  --grpo       also GRPO's trainer side (GRPOModule) on the same tokens: offline batches of
               accumulate x batch-size rows of seq-len tokens, the last --completion-len of each
               labelled (a rollout's completion), one optimizer step per batch in micro-batches
               of batch-size rows, as a GRPO run with old_logps=policy trains (no generation).
               Side by side with the pre-training path, it shows what GRPO's own step costs.
  --profile    after the timed steps, one more step of each run under torch.profiler: the
               operators with the most device time and with the most host time, and the
               step's wall time against its device time (how long the device sat idle). On a
               GPU, one step more under torch.cuda.set_sync_debug_mode: every operation that
               made the host wait for the device, counted by the line of ours that asked.

    uv run python bench/train_throughput.py --model configs/model/tinyllama-1.1b.json \
        --batch-size 8 --seq-len 2048 --compile --overhead --reference --param-dtype float32 bfloat16
    uv run python bench/train_throughput.py   # CPU: tiny model, Lightning only
    uv run python bench/train_throughput.py --model configs/model/qwen2.5-0.5b.json --batch-size 16 \
        --seq-len 320 --accumulate 32 --param-dtype bfloat16 --compile --grpo --profile

MFU = tokens/s x model FLOPs per token (astrai.train.metrics.flops_per_token, the same for
the reference, whose shape is ours) / peak FLOP/s of the device (Lightning's table by GPU
name and dtype, or --peak-flops); a CPU has no listed peak: n/a unless --peak-flops is given.
Peak memory is the most allocated by the caching allocator during the timed steps, less what
was allocated before the run started (nothing, when the earlier runs were freed).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import time
import traceback
import warnings

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from astrai.core.auto import AutoModel
from astrai.core.config import ModelConfig
from astrai.train.base_module import COMPILE_MODES
from astrai.train.grpo_module import GRPOModule
from astrai.train.metrics import flops_per_token, peak_flops, precision_dtype
from astrai.train.pretrain_module import PretrainModule


class RandomTokens(Dataset):
    def __init__(self, n_rows: int, seq_len: int, vocab: int):
        self.n_rows, self.seq_len, self.vocab = n_rows, seq_len, vocab

    def __len__(self):
        return self.n_rows

    def __getitem__(self, i):
        ids = torch.randint(0, self.vocab, (self.seq_len + 1,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids[:-1], "labels": ids[1:]}


class RolloutRows(Dataset):
    """GRPO's offline batches, one optimizer step's each: `rows` sequences of seq_len tokens
    whose last `completion` tokens are the completion (labelled), random rewards in groups of 8."""

    def __init__(self, n_batches: int, rows: int, seq_len: int, completion: int, vocab: int):
        self.n_batches, self.rows, self.seq_len, self.completion, self.vocab = (
            n_batches,
            rows,
            seq_len,
            completion,
            vocab,
        )

    def __len__(self):
        return self.n_batches

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(0, self.vocab, (self.rows, self.seq_len), generator=g)
        labels = torch.full_like(ids, -100)
        start = self.seq_len - self.completion
        labels[:, start - 1 : -1] = ids[:, start:]  # labels[t] is the token after input_ids[:t+1]
        return {
            "input_ids": ids,
            "labels": labels,
            "attention_mask": torch.ones_like(ids),
            "rewards": torch.rand(self.rows, generator=g),
            "group_ids": torch.arange(self.rows) // 8,
        }


class ProfileOneStep(L.Callback):
    """torch.profiler over the optimizer step that starts at global step `at`; prints its
    operators with the most device time and with the most host time, and the step's wall time
    against its device time. On a GPU, the step after it runs under SyncCounter."""

    def __init__(self, at: int, name: str, rows: int = 25):
        self.at, self.name, self.rows = at, name, rows
        self.profiler = self.syncs = None
        self.started = 0.0  # when the profiled step began (perf_counter)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.profiler is None and trainer.global_step == self.at:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if module.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
            self.started = time.perf_counter()
        if self.syncs is None and module.device.type == "cuda" and trainer.global_step == self.at + 1:
            torch.cuda.synchronize(module.device)
            self.syncs = SyncCounter().__enter__()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.profiler is not None and trainer.global_step == self.at + 1:
            if module.device.type == "cuda":
                torch.cuda.synchronize(module.device)
            wall = time.perf_counter() - self.started
            profiler, self.profiler = self.profiler, None
            profiler.__exit__(None, None, None)
            averages = profiler.key_averages()
            print(f"\n-- profile of one optimizer step: {self.name} --")
            if module.device.type == "cuda":
                print(averages.table(sort_by="self_device_time_total", row_limit=self.rows))
                print_idle_gaps(profiler.events(), wall)
            print(averages.table(sort_by="self_cpu_time_total", row_limit=self.rows))
        if self.syncs is not None and trainer.global_step == self.at + 2:
            self.syncs.__exit__(None, None, None)
            print(f"\n-- host waits for the device in one optimizer step: {self.name} --")
            self.syncs.print_report()
            self.syncs = None


def print_idle_gaps(events, wall: float, largest: int = 12) -> None:
    """Where the device sat idle in a profiled step of `wall` seconds: its kernels' busy time
    (the union of their intervals: operator rows would count a kernel twice), the gaps between
    them, and for the largest gaps, the host operations under way at the middle (innermost last)."""
    kernels = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type.name == "CUDA")
    host = [e for e in events if e.device_type.name == "CPU"]
    if not kernels:
        return
    busy, gaps = [list(kernels[0])], []
    for start, stop in kernels[1:]:
        if start > busy[-1][1]:
            gaps.append((start - busy[-1][1], busy[-1][1], start))
            busy.append([start, stop])
        else:
            busy[-1][1] = max(busy[-1][1], stop)
    busy_s = sum(b - a for a, b in busy) / 1e6
    print(f"wall {wall:.3f} s under the profiler, device busy {busy_s:.3f} s ({busy_s / wall:.0%})")
    print(
        f"device idle between kernels: {sum(g[0] for g in gaps) / 1e3:.1f} ms in {len(gaps)} gaps; over 1 ms: "
        f"{sum(g[0] for g in gaps if g[0] > 1e3) / 1e3:.1f} ms in {sum(g[0] > 1e3 for g in gaps)}"
    )
    for length, start, stop in sorted(gaps, reverse=True)[:largest]:
        middle = (start + stop) / 2
        under_way = sorted(
            (e for e in host if e.time_range.start <= middle <= e.time_range.end),
            key=lambda e: -(e.time_range.end - e.time_range.start),
        )
        names = " > ".join(e.name[:40] for e in under_way[-4:]) or "(no host operation)"
        print(f"  {length / 1e3:7.2f} ms  {names}")


class SyncCounter:
    """Counts the operations that make the host wait for the device (torch's sync debug mode,
    which warns at each), by the innermost line of astrai's code (else Lightning's) that
    called them: each is a point where the GPU runs dry while the host catches up."""

    OURS = ("astrai", "bench")

    def __init__(self):
        self.sites: dict[str, int] = {}
        self.messages: dict[str, str] = {}

    def __enter__(self):
        self.caught = warnings.catch_warnings()
        self.caught.__enter__()
        warnings.simplefilter("always")
        self.old_show = warnings.showwarning
        warnings.showwarning = self.record
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = self.old_show
        self.caught.__exit__(*exc)

    def record(self, message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if "synchronizing" not in text or text.startswith("Synchronization debug mode"):  # (its own notice)
            return self.old_show(message, category, filename, lineno, file, line)
        frames = traceback.extract_stack()[:-1]
        ours = [f for f in frames if any(f"/{part}/" in f.filename for part in self.OURS)]
        lightning = [f for f in frames if "/lightning/" in f.filename]
        frame = (ours or lightning or frames)[-1]
        site = f"{frame.filename.split('/src/')[-1]}:{frame.lineno} {frame.name}: {(frame.line or '').strip()[:60]}"
        self.sites[site] = self.sites.get(site, 0) + 1
        self.messages.setdefault(site, str(message).split("\n")[0][:80])

    def print_report(self) -> None:
        print(f"{sum(self.sites.values())} waits")
        for site, count in sorted(self.sites.items(), key=lambda item: -item[1]):
            print(f"{count:6d}  {site}  [{self.messages[site]}]")


class Window:
    """Wall time and peak memory of the steps after `warmup` (compilation, allocator warm-up
    excluded); the device is synchronised only at the window's two ends."""

    def __init__(self, warmup: int, steps: int, device: torch.device, base: int | None = None):
        self.warmup, self.steps, self.device = warmup, steps, device
        self.base = base if base is not None else allocated(device)
        self.start = self.end = None
        self.peak = None
        self.step_ends: list[float] = []  # each timed step's end (one more wait per step)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def after_step(self, done: int) -> bool:
        """Call after each batch with the optimizer steps `done` so far (with gradient
        accumulation, after every micro-batch: several calls see the same count); True when the
        window is complete. It opens on the first call that sees `warmup` steps done and closes
        on the first that sees warmup + steps (opening again on each later micro-batch of a step
        timed as little as one micro-batch of the first timed step)."""
        if done == self.warmup and self.start is None:
            self._sync()
            self.start = time.perf_counter()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
        elif self.start is not None and self.end is None and done > self.warmup + len(self.step_ends):
            self._sync()
            self.step_ends.append(time.perf_counter())
            if done == self.warmup + self.steps:
                self.end = self.step_ends[-1]
                if self.device.type == "cuda":
                    self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
                return True
        return False

    @property
    def each_step_ms(self) -> list[float]:
        """Every timed optimizer step's milliseconds (a slow one stands out: a recompilation,
        the allocator asking the driver for memory)."""
        ends = [self.start, *self.step_ends]
        return [round((b - a) * 1e3, 1) for a, b in zip(ends, ends[1:])]

    @property
    def step_seconds(self) -> float:
        return (self.end - self.start) / self.steps


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


class StepTimer(L.Callback):
    def __init__(self, warmup: int, steps: int, base: int):
        self.warmup, self.steps, self.base = warmup, steps, base
        self.window: Window | None = None

    def on_train_start(self, trainer, module):
        # The module's device is known here (each rank's own); the memory base was taken before fit.
        self.window = Window(self.warmup, self.steps, module.device, self.base)
        self.window.after_step(0)  # with no warm-up, the window opens before the first batch

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.window.after_step(trainer.global_step)


# -- the runs ---------------------------------------------------------------------------------
def load_config(args) -> dict:
    with open(args.model, encoding="utf-8") as f:
        config = json.load(f)
    config.pop("extra", None)
    if args.vocab_size:
        config["vocab_size"] = args.vocab_size
    config["max_len"] = max(config.get("max_len", 0), args.seq_len)
    return config


def shape_stats(config: dict, seq_len: int) -> tuple[int, float]:
    """(parameters, training FLOPs per token) of the model, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = AutoModel.from_config(ModelConfig.from_dict(config))
    return model.num_parameters(), flops_per_token(model, model.config, seq_len)


def module_options(args, config: dict, param_dtype: str, compile_mode: str = "default") -> dict:
    """The options every timed module shares (the pre-training and the GRPO run alike)."""
    return dict(
        model=config,
        gradient_checkpointing=args.gradient_checkpointing,
        compile=args.compile,
        compile_mode=compile_mode,
        param_dtype=param_dtype,
        peak_flops=args.peak_flops,
        optimizer={"name": args.optimizer, "lr": 1e-4},
        schedule={"name": "constant"},
        export={"on_fit_end": False},
    )


def make_module(args, config: dict, param_dtype: str, compile_mode: str = "default") -> PretrainModule:
    torch.manual_seed(0)
    return PretrainModule(**module_options(args, config, param_dtype, compile_mode))


def make_loader(args, config: dict, world_size: int = 1) -> DataLoader:
    rows = (args.warmup + args.steps + 2) * args.accumulate * args.batch_size * world_size
    return DataLoader(
        RandomTokens(rows, args.seq_len, config["vocab_size"]),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        pin_memory=torch.cuda.is_available(),
    )


def make_trainer(args, timer: StepTimer, name: str, accumulate: int) -> L.Trainer:
    callbacks = [timer]
    if args.profile:  # one step after the timed ones
        callbacks.append(ProfileOneStep(args.warmup + args.steps, name))
    return L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=args.strategy,
        precision=args.precision,
        max_steps=args.warmup + args.steps + 2 * int(args.profile),
        logger=False,
        accumulate_grad_batches=accumulate,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        limit_val_batches=0,
    )


def run_name(kind: str, param_dtype: str, compile_mode: str) -> str:
    return f"{kind} {param_dtype}" + ("" if compile_mode == "default" else f" {compile_mode}")


def run_lightning(args, config: dict, param_dtype: str, device: torch.device, compile_mode: str) -> dict | None:
    module = make_module(args, config, param_dtype, compile_mode)
    timer = StepTimer(args.warmup, args.steps, allocated(device))
    name = run_name("lightning", param_dtype, compile_mode)
    trainer = make_trainer(args, timer, name, args.accumulate)
    trainer.fit(module, make_loader(args, config, trainer.world_size))
    if not trainer.is_global_zero:
        return None
    return result_row(name, args, timer.window, trainer.world_size)


def run_grpo(args, config: dict, param_dtype: str, device: torch.device, compile_mode: str) -> dict | None:
    """GRPOModule's optimizer steps on rollout-shaped offline batches (see --grpo)."""
    torch.manual_seed(0)
    options = module_options(args, config, param_dtype, compile_mode)
    module = GRPOModule(group_size=8, micro_batch_size=args.batch_size, **options)
    timer = StepTimer(args.warmup, args.steps, allocated(device))
    name = run_name("grpo", param_dtype, compile_mode)
    trainer = make_trainer(args, timer, name, 1)
    rows = args.accumulate * args.batch_size
    batches = RolloutRows(args.warmup + args.steps + 2, rows, args.seq_len, args.completion_len, config["vocab_size"])
    trainer.fit(module, DataLoader(batches, batch_size=None, pin_memory=torch.cuda.is_available()))
    if not trainer.is_global_zero:
        return None
    return result_row(name, args, timer.window, trainer.world_size)


def plain_autocast(precision: str, device: torch.device):
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision in ("32-true", "32"):
        return contextlib.nullcontext()
    raise ValueError(f"--overhead: the plain loop reproduces precision bf16-mixed or 32-true, not {precision!r}")


def timed_loop(args, loader, device, step_fn) -> Window:
    window = Window(args.warmup, args.steps, device)
    window.after_step(0)
    for done, batch in enumerate(loader, start=1):
        step_fn({k: v.to(device, non_blocking=True) for k, v in batch.items()})
        if window.after_step(done):
            return window
    raise RuntimeError("the loader ran out before the timed steps ended")


def run_plain(args, config: dict, param_dtype: str, device: torch.device, compile_mode: str) -> dict:
    """The PretrainModule and its optimizer without Lightning: what a hand-written loop would do."""
    module = make_module(args, config, param_dtype, compile_mode)
    module.configure_model()  # param dtype, torch.compile: as Lightning calls it
    module.to(device).train()
    setup = module.configure_optimizers()
    optimizer, scheduler = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    autocast = plain_autocast(args.precision, device)

    def step(batch):
        with autocast:
            _, out = module.compute_loss(batch, "train")
            loss = module.add_aux_loss(out.loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

    window = timed_loop(args, make_loader(args, config), device, step)
    return result_row(run_name("plain loop", param_dtype, compile_mode), args, window, 1)


def run_reference(args, config: dict, device: torch.device) -> dict:
    """transformers' LlamaForCausalLM, same shape, as a user of transformers would train it."""
    import transformers

    from astrai.core.hf_config import to_hf_dict

    ours = ModelConfig.from_dict(config)
    fields = {k: v for k, v in to_hf_dict(ours).items() if k not in ("model_type", "architectures", "astrai")}
    fields["use_cache"] = False
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM._from_config(
            transformers.LlamaConfig(**fields), attn_implementation="sdpa"
        )
    model.train()
    if args.compile:
        model.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    autocast = plain_autocast(args.precision, device)

    def step(batch):
        with autocast:
            loss = model(input_ids=batch["input_ids"], labels=batch["input_ids"], use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    window = timed_loop(args, make_loader(args, config), device, step)
    # The same shape as ours, so the same model FLOPs per token.
    return result_row(f"transformers {transformers.__version__}", args, window, 1)


def result_row(name: str, args, window: Window, world_size: int) -> dict:
    device = window.device
    per_device = args.accumulate * args.batch_size * args.seq_len / window.step_seconds
    fpt = args.flops_per_token
    peak = args.peak_flops or peak_flops(device, precision_dtype(args.precision))
    return {
        "run": name,
        "tokens_per_sec": round(per_device * world_size),
        "step_ms": round(window.step_seconds * 1e3, 2),
        "each_step_ms": window.each_step_ms,
        "model_tflops_per_device": round(per_device * fpt / 1e12, 2),
        "mfu": round(per_device * fpt / peak, 4) if peak else None,
        "peak_memory_gib": round(window.peak / 2**30, 2) if window.peak is not None else None,
    }


def finished(rows: list[dict], row: dict) -> None:
    """Keep a run's row and print it at once: a run cut short later leaves the earlier figures.
    Other ranks than zero have no row."""
    if row is None:
        return
    rows.append(row)
    print(f"finished: {json.dumps(row)}", flush=True)


def release() -> None:
    """Free the last run's model, optimizer and compiled graphs before the next one."""
    torch._dynamo.reset()  # first: compiled graphs hold the old modules
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- report -----------------------------------------------------------------------------------
def print_report(header: dict, rows: list[dict], args) -> None:
    for key, value in header.items():
        print(f"{key:<24}{value}")
    print(f"\n{'run':<34}{'tok/s':>10}{'step ms':>10}{'TFLOP/s':>10}{'MFU':>8}{'peak GiB':>10}")
    for r in rows:
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.3f}"
        mem = "n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
        print(
            f"{r['run']:<34}{r['tokens_per_sec']:>10,}{r['step_ms']:>10.1f}{r['model_tflops_per_device']:>10.1f}"
            f"{mfu:>8}{mem:>10}"
        )
    by_name = {r["run"]: r for r in rows}
    reference = next((r for r in rows if r["run"].startswith("transformers")), None)
    print()
    for dtype in args.param_dtype:
        ours, plain = by_name.get(f"lightning {dtype}"), by_name.get(f"plain loop {dtype}")
        grpo = by_name.get(f"grpo {dtype}")
        if ours and grpo:
            ratio = grpo["tokens_per_sec"] / ours["tokens_per_sec"]
            grpo["vs_pretrain"] = round(ratio, 3)
            print(f"GRPO trainer / pre-training path, param_dtype {dtype}: {ratio:.3f}x tokens/s (same tokens)")
        if ours and plain:
            overhead = ours["step_ms"] / plain["step_ms"] - 1
            ours["lightning_overhead"] = round(overhead, 4)
            print(f"Lightning overhead, param_dtype {dtype}: {overhead:+.2%} (Lightning step / plain-loop step - 1)")
        if ours and reference:
            ratio = ours["tokens_per_sec"] / reference["tokens_per_sec"]
            ours["vs_reference"] = round(ratio, 3)
            print(f"ours / transformers, param_dtype {dtype}: {ratio:.3f}x tokens/s")
    print(json.dumps({**header, "rows": rows}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="configs/model/tiny.json", help="ModelConfig JSON (e.g. configs/model/*.json)")
    p.add_argument("--vocab-size", type=int, default=None, help="override the config's vocab_size")
    p.add_argument("--batch-size", type=int, default=8, help="rows per device")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator)")
    p.add_argument("--precision", default=None, help="Lightning precision; default bf16-mixed on GPU, 32-true on CPU")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"])
    p.add_argument(
        "--param-dtype",
        nargs="+",
        default=["float32"],
        choices=["float32", "bfloat16"],
        help="module option param_dtype; several: one run of ours each",
    )
    p.add_argument("--compile", action="store_true")
    p.add_argument(
        "--compile-mode",
        nargs="+",
        default=["default"],
        choices=COMPILE_MODES,
        help="with --compile: module option compile_mode; several: one run of ours each (e.g. default "
        "reduce-overhead: CUDA graphs against launching every kernel)",
    )
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--accumulate", type=int, default=1, help="batches per optimizer step (Lightning runs only)")
    p.add_argument("--overhead", action="store_true", help="also time a plain loop (Lightning's overhead)")
    p.add_argument("--reference", action="store_true", help="also time transformers' LlamaForCausalLM")
    p.add_argument("--grpo", action="store_true", help="also time GRPO's trainer on the same tokens (see above)")
    p.add_argument(
        "--completion-len", type=int, default=None, help="with --grpo: labelled tokens a row (default: seq-len - 64)"
    )
    p.add_argument("--profile", action="store_true", help="profile one more step of each run (see above)")
    p.add_argument("--grpo-first", action="store_true", help="with --grpo: run GRPO's trainer before the others")
    p.add_argument("--grpo-only", action="store_true", help="with --grpo: only GRPO's trainer (no pre-training run)")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", default="auto")
    p.add_argument("--strategy", default="auto")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--peak-flops", type=float, default=None, help="peak FLOP/s of one device, for MFU")
    args = p.parse_args()
    if args.precision is None:
        args.precision = "bf16-mixed" if torch.cuda.is_available() else "32-true"
    if args.devices != "auto":
        args.devices = int(args.devices)
    if args.accumulate < 1:
        p.error(f"--accumulate must be >= 1, got {args.accumulate}")
    if args.completion_len is None:
        args.completion_len = max(1, args.seq_len - 64)
    if not 1 <= args.completion_len < args.seq_len:
        p.error(f"--completion-len must be in [1, seq-len), got {args.completion_len}")
    if args.grpo_only and not args.grpo:
        p.error("--grpo-only needs --grpo")
    if args.compile_mode != ["default"] and not args.compile:
        p.error("--compile-mode needs --compile")
    if args.accumulate > 1 and (args.overhead or args.reference):
        p.error("--accumulate times Lightning runs only: drop --overhead / --reference")
    if args.overhead or args.reference:
        if args.devices not in ("auto", 1):
            p.error("--overhead and --reference time one device: use --devices 1")
        args.devices = 1
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(LeafSpec|val_dataloader|does not have many workers).*")
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
    use_cuda = args.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    config = load_config(args)
    n_params, args.flops_per_token = shape_stats(config, args.seq_len)

    rows = []
    for dtype in args.param_dtype:
        for mode in args.compile_mode:
            if args.grpo and (args.grpo_first or args.grpo_only):
                finished(rows, run_grpo(args, config, dtype, device, mode))
                release()
            if args.grpo_only:
                continue
            row = run_lightning(args, config, dtype, device, mode)
            if row is None:  # not rank zero
                return
            finished(rows, row)
            release()
            if args.overhead:
                finished(rows, run_plain(args, config, dtype, device, mode))
                release()
            if args.grpo and not args.grpo_first:
                finished(rows, run_grpo(args, config, dtype, device, mode))
                release()
    if args.reference:
        finished(rows, run_reference(args, config, device))
        release()
    header = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": args.model,
        "params": n_params,
        "batch_size": args.batch_size,
        "accumulate": args.accumulate,
        "seq_len": args.seq_len,
        "precision": args.precision,
        "optimizer": args.optimizer,
        "compile": args.compile,
        "compile_mode": args.compile_mode if args.compile else None,
        "gradient_checkpointing": args.gradient_checkpointing,
        "steps_timed": args.steps,
        "grpo_completion_len": args.completion_len if args.grpo else None,
        "peak_flops_per_device": args.peak_flops or peak_flops(device, precision_dtype(args.precision)),
    }
    print_report(header, rows, args)


if __name__ == "__main__":
    main()
