"""Helpers for the training tests (imported by tests/train/test_*.py; fixtures are in conftest.py):
a tiny corpus and model shape, learnable batches that follow the batch contract, a quiet CPU Trainer."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Language models predict the next token from the ones before it.",
    "Small models can be trained on a laptop in a few minutes.",
    "今天天气很好，我们去公园散步吧。",
    "机器学习模型从数据中学习规律。",
    "小模型也可以在笔记本电脑上训练。",
    "Hello world! 你好，世界！",
    "One, two, three, four, five. 一二三四五。",
]

TINY_MODEL = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_len=128, init_std=0.02)

logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
logging.getLogger("lightning.fabric").setLevel(logging.WARNING)

# Lightning's advice about worker counts, logging intervals and missing loaders is noise at this scale.
QUIET_WARNINGS = [
    "does not have many workers",
    "log_every_n_steps",
    "smaller than the logging interval",
    "but have no `val_dataloader`",
    "LeafSpec",
    "LitLogger",
    "Checkpoint directory .* exists",
    "args parameter is intended to run from within Python",
    "Total length of .* across ranks is zero",
]


class CycleBatches(Dataset):
    """Rows of a periodic token sequence: every next token is fully determined by the current
    one, so a model that learns anything drives the loss towards zero."""

    def __init__(self, n_rows: int = 16, seq_len: int = 16, vocab: int = 320, period: int = 7, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        cycle = torch.randperm(vocab - 10, generator=g)[:period] + 10  # avoid the special tokens
        self.rows = []
        for i in range(n_rows):
            ids = cycle[(torch.arange(seq_len + 1) + i) % period]
            self.rows.append({"input_ids": ids[:-1].clone(), "labels": ids[1:].clone()})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class TinyData(L.LightningDataModule):
    """A LightningDataModule over CycleBatches with a seeded, epoch-dependent shuffle."""

    def __init__(self, n_rows: int = 16, seq_len: int = 16, batch_size: int = 4, vocab: int = 320):
        super().__init__()
        self.train_set = CycleBatches(n_rows, seq_len, vocab)
        self.val_set = CycleBatches(8, seq_len, vocab, seed=0)
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(
            self.train_set, batch_size=self.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)
        )

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)


def make_trainer(tmp_path, **kwargs) -> L.Trainer:
    """A quiet CPU Trainer writing under tmp_path."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_steps=10,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def write_text_rows(root: Path, tokenizer_dir) -> dict[str, Path | str]:
    """60 short bilingual text rows, the tiny model's config and a cache folder under root:
    the inputs of the multi-process training tests."""
    rows = root / "text.jsonl"
    rows.write_text(
        "".join(json.dumps({"text": f"row {i}: the cat sat on the mat, 猫坐在垫子上。"}) + "\n" for i in range(60))
    )
    model = root / "tiny.json"
    model.write_text(json.dumps(TINY_MODEL))
    return {"rows": rows, "model": model, "tokenizer": tokenizer_dir, "cache": root / "cache"}


def pretrain_fit_args(inputs, root: Path, steps: int, batch_size: int, cache: Path, decay_steps: int) -> list[str]:
    """`astrai-train` arguments of a CPU pre-training run of the tiny model over write_text_rows'
    inputs: logged every step, no progress bar (the multi-process tests compare these logs)."""
    return [
        "fit",
        "--model=seq",
        f"--model.model={inputs['model']}",
        "--model.optimizer.lr=3e-3",
        "--model.schedule.warmup_steps=2",
        f"--model.schedule.decay_steps={decay_steps}",
        "--data=pretrain",
        f"--data.train={inputs['rows']}",
        f"--data.tokenizer={inputs['tokenizer']}",
        "--data.seq_len=16",
        f"--data.batch_size={batch_size}",
        f"--data.cache_dir={cache}",
        f"--trainer.max_steps={steps}",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={root}",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]


def logged_losses(root: Path) -> dict[int, float]:
    """train/loss per step from every CSV log under root (one version per run); every row must
    be of the first epoch (the multi-process tests compare runs inside it)."""
    out: dict[int, float] = {}
    for path in sorted((root / "logs").glob("version_*/metrics.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    assert row["epoch"] == "0", "the runs must stay inside the first epoch"
                    out[int(row["step"])] = float(row["train/loss"])
    return out


def save_random_model(path: Path, tokenizer_dir, seed: int, **fields) -> Path:
    """A model directory the engine can serve: random weights of a ModelConfig of `fields`, with
    the vocabulary and special ids of the tokenizer (saved beside it, chat template included)."""
    from astrai.core.auto import AutoModel
    from astrai.core.config import ModelConfig
    from astrai.core.tokenizer import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = ModelConfig(
        vocab_size=tok.vocab_size,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **fields,
    )
    torch.manual_seed(seed)
    AutoModel.save_pretrained(AutoModel.from_config(config), path, tokenizer=tok)
    return path
