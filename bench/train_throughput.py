"""Training throughput of `astrai-train`'s pre-training module: tokens/s and MFU.

Runs SeqModule under a real Lightning Trainer on random tokens (so data loading costs
nothing) and times the optimizer steps after a warm-up, synchronising the device at both ends.

    uv run python bench/train_throughput.py --model configs/model/tinyllama-1.1b.json \
        --batch-size 8 --seq-len 2048 --precision bf16-mixed --compile
    uv run python bench/train_throughput.py --model configs/model/tiny.json --batch-size 8 --seq-len 256   # CPU

MFU = tokens/s x model FLOPs per token (astrai.train.metrics.flops_per_token) / peak FLOP/s
of the devices (Lightning's table by GPU name and dtype, or --peak-flops). A CPU has no
listed peak: MFU is then reported as n/a unless --peak-flops is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from astrai.train.metrics import flops_per_token, peak_flops, precision_dtype
from astrai.train.seq_module import SeqModule


class RandomTokens(Dataset):
    def __init__(self, n_rows: int, seq_len: int, vocab: int):
        self.n_rows, self.seq_len, self.vocab = n_rows, seq_len, vocab

    def __len__(self):
        return self.n_rows

    def __getitem__(self, i):
        ids = torch.randint(0, self.vocab, (self.seq_len + 1,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids[:-1], "labels": ids[1:]}


class StepTimer(L.Callback):
    """Wall time of the steps after `warmup` (compilation, allocator warm-up excluded)."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.start = self.end = None
        self.steps = 0
        self.device = torch.device("cpu")  # Lightning moves the model back to the CPU after fit

    def _sync(self, module):
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.device = module.device
        if trainer.global_step == self.warmup:
            self._sync(module)
            self.start = time.perf_counter()
            if module.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(module.device)
        elif trainer.global_step > self.warmup:
            self._sync(module)
            self.end = time.perf_counter()
            self.steps = trainer.global_step - self.warmup


def run(args) -> dict:
    with open(args.model, encoding="utf-8") as f:
        config = json.load(f)
    config.pop("extra", None)
    if args.vocab_size:
        config["vocab_size"] = args.vocab_size
    config["max_len"] = max(config.get("max_len", 0), args.seq_len)
    torch.manual_seed(0)
    module = SeqModule(model=config, optimizer=args.optimizer, lr=1e-4, scheduler="constant",
                       gradient_checkpointing=args.gradient_checkpointing, compile=args.compile,
                       export_on_fit_end=False, peak_flops=args.peak_flops)
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(accelerator=args.accelerator, devices=args.devices, strategy=args.strategy,
                        precision=args.precision, max_steps=args.warmup + args.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[timer], limit_val_batches=0)
    rows = (args.warmup + args.steps + 1) * args.batch_size * trainer.world_size
    data = DataLoader(RandomTokens(rows, args.seq_len, config["vocab_size"]), batch_size=args.batch_size,
                      num_workers=args.num_workers, pin_memory=torch.cuda.is_available())
    trainer.fit(module, data)
    if not trainer.is_global_zero:
        return None

    elapsed = timer.end - timer.start
    per_device = timer.steps * args.batch_size * args.seq_len / elapsed
    device = timer.device
    peak = args.peak_flops or peak_flops(device, precision_dtype(trainer.precision))
    fpt = flops_per_token(module.model, module.config, args.seq_len)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "devices": trainer.world_size,
        "model": args.model,
        "params": module.model.num_parameters(),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "precision": str(trainer.precision),
        "optimizer": args.optimizer,
        "compile": args.compile,
        "gradient_checkpointing": args.gradient_checkpointing,
        "steps_timed": timer.steps,
        "tokens_per_sec": round(per_device * trainer.world_size),
        "tokens_per_sec_per_device": round(per_device),
        "model_tflops_per_device": round(per_device * fpt / 1e12, 2),
        "mfu": round(per_device * fpt / peak, 4) if peak else None,
        "peak_flops_per_device": peak,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }
    return result


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
    p.add_argument("--compile", action="store_true")
    p.add_argument("--gradient-checkpointing", action="store_true")
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
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(LeafSpec|val_dataloader|does not have many workers).*")
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
    result = run(args)
    if result is None:
        return
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {'n/a' if value is None else value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
