"""Resuming mid-epoch continues with exactly the batches an uninterrupted run would have seen."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from data_helpers import VOCAB, word_tokenizer, write_jsonl
from lightning.pytorch.callbacks import ModelCheckpoint

from astrai.train.data import PretrainDataModule
from astrai.train.data.loader import ResumableDataLoader, ResumableSampler


def loader(n=20, batch_size=3, seed=0, rank=0, world=1):
    data = list(range(n))
    return ResumableDataLoader(
        data, batch_size=batch_size, sampler=ResumableSampler(data, num_replicas=world, rank=rank, seed=seed)
    )


def batches(dl, epoch, limit=None):
    dl.sampler.set_epoch(epoch)
    out = []
    for b in dl:
        out.append(b.tolist())
        if limit is not None and len(out) == limit:
            break
    return out


def test_loader_state_skips_exactly_the_batches_already_seen():
    full = batches(loader(), epoch=2)
    first = loader()
    head = batches(first, epoch=2, limit=4)
    state = first.state_dict()
    assert state == {"epoch": 2, "batches": 4}
    resumed = loader()
    resumed.load_state_dict(state)
    assert head + batches(resumed, epoch=2) == full
    assert batches(resumed, epoch=3) == batches(loader(), epoch=3)  # the skip applies once


def test_state_from_an_epoch_end_or_another_epoch_skips_nothing():
    first = loader()
    batches(first, epoch=0)
    resumed = loader()
    resumed.load_state_dict(first.state_dict())  # the whole epoch was done
    assert batches(resumed, epoch=1) == batches(loader(), epoch=1)
    resumed.load_state_dict({"epoch": 0, "batches": 2})
    assert batches(resumed, epoch=1) == batches(loader(), epoch=1)


def test_each_rank_skips_its_own_share():
    for rank in range(2):
        full = batches(loader(rank=rank, world=2), epoch=0)
        first = loader(rank=rank, world=2)
        head = batches(first, epoch=0, limit=2)
        resumed = loader(rank=rank, world=2)
        resumed.load_state_dict(first.state_dict())
        assert head + batches(resumed, epoch=0) == full


class Recorder(L.LightningModule):
    """A small real model that remembers every training batch it was given."""

    def __init__(self, vocab: int):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 8)
        self.out = torch.nn.Linear(8, vocab)
        self.seen: list[list[list[int]]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"].tolist())
        logits = self.out(self.emb(batch["input_ids"]))
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _fit(tmp_path, data_path, tok, max_steps, ckpt_path=None, name="run"):
    torch.manual_seed(0)
    module = Recorder(len(VOCAB))
    dm = PretrainDataModule(tok, data_path, seq_len=4, batch_size=2, cache_dir=str(tmp_path / "cache"), seed=3)
    ckpt = ModelCheckpoint(dirpath=tmp_path / name, every_n_train_steps=1, save_last=True, save_top_k=0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        callbacks=[ckpt],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module, tmp_path / name / "last.ckpt"


@pytest.mark.parametrize("stop_at", [3, 5, 6])  # mid-epoch, at the epoch's end (5 batches), in epoch 2
def test_lightning_resume_sees_the_same_batches_as_an_uninterrupted_run(tmp_path, stop_at):
    tok = word_tokenizer(tmp_path / "tok")
    # 40 tokens -> 10 windows of 4 -> 5 batches of 2 per epoch; 8 steps cross into the second epoch.
    data = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in ["a b c d e f g"] * 2 + ["a b c"] * 2])
    whole, _ = _fit(tmp_path, data, tok, max_steps=8, name="whole")
    assert len(whole.seen) == 8 and whole.seen[:5] != whole.seen[5:]

    first, last = _fit(tmp_path, data, tok, max_steps=stop_at, name="part")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not resumable.*")  # Lightning's warning for plain loaders
        rest, _ = _fit(tmp_path, data, tok, max_steps=8, ckpt_path=str(last), name="rest")
    assert first.seen + rest.seen == whole.seen
    for a, b in zip(whole.parameters(), rest.parameters()):
        torch.testing.assert_close(a, b)
