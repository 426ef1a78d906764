"""A run does not resume from a damaged Lightning checkpoint: ChecksummedCheckpointIO writes a
`.sha256` sidecar with every checkpoint and checks it before reading; a file torch.load cannot
read is reported the same way; strategies that read checkpoints themselves (FSDP) are checked
by the Checkpoint callback. Intact checkpoints resume as before."""

from __future__ import annotations

import hashlib
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from test_resume import _loader, _module, _tiny_json
from train_helpers import make_trainer

from astrai.core.integrity import IntegrityError
from astrai.train.checkpoint_io import ChecksummedCheckpointIO
from astrai.train.checkpointing import Checkpoint
from astrai.train.cli import main

STEPS = 4
EARLIER = f"epoch=0-step={STEPS}.ckpt"  # save_top_k=1 keeps the newest step checkpoint beside last.ckpt


def fit(root: Path, tokenizer_dir, steps: int, resume: bool = False, **trainer_kwargs):
    module = _module(tokenizer_dir)
    checkpoint = Checkpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=1)
    trainer = make_trainer(
        root,
        max_steps=steps,
        callbacks=[checkpoint],
        enable_checkpointing=True,
        limit_val_batches=0,
        plugins=[ChecksummedCheckpointIO()],
        **trainer_kwargs,
    )
    trainer.fit(module, _loader(), ckpt_path="last" if resume else None)
    return trainer


@pytest.fixture
def run(tmp_path, tokenizer_dir) -> Path:
    """A run folder after STEPS steps. Each test fits its own: a copy would sit in another folder,
    for which ModelCheckpoint starts a new last-v1.ckpt instead of replacing last.ckpt."""
    fit(tmp_path / "run", tokenizer_dir, STEPS)
    return tmp_path / "run"


def overwrite(file: Path, offset: int, size: int) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * size)


def middle(file: Path, size: int) -> int:
    return file.stat().st_size // 2 - size // 2


def inside_the_largest_record(file: Path, size: int) -> int:
    """An offset inside the data of the checkpoint's largest tensor, where torch.load sees no damage."""
    with zipfile.ZipFile(file) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)
    with open(file, "rb") as f:
        f.seek(record.header_offset + 26)  # the local header's name and extra-field lengths
        name_length, extra_length = struct.unpack("<HH", f.read(4))
    assert record.file_size > 2 * size
    return record.header_offset + 30 + name_length + extra_length + record.file_size // 2 - size // 2


def test_each_checkpoint_gets_a_sha256sum_sidecar_and_pruned_ones_lose_theirs(run):
    names = sorted(p.name for p in (run / "ckpt").iterdir())
    assert names == [EARLIER, f"{EARLIER}.sha256", "last.ckpt", "last.ckpt.sha256"]
    for checkpoint in ("last.ckpt", EARLIER):
        digest = hashlib.sha256((run / "ckpt" / checkpoint).read_bytes()).hexdigest()
        assert (run / "ckpt" / f"{checkpoint}.sha256").read_text() == f"{digest}  {checkpoint}\n"


def test_resuming_from_a_last_ckpt_with_16_kib_overwritten_stops_with_a_clear_error(run, tokenizer_dir):
    last = run / "ckpt" / "last.ckpt"
    overwrite(last, middle(last, 16384), 16384)
    with pytest.raises(IntegrityError) as err:
        fit(run, tokenizer_dir, 2 * STEPS, resume=True)
    message = str(err.value)
    assert f"{last}: its sha256 differs from the one last.ckpt.sha256 recorded" in message
    assert "the checkpoint is damaged" in message
    assert f"--ckpt_path={run / 'ckpt' / EARLIER}" in message and "without --ckpt_path" in message


def test_an_intact_checkpoint_resumes_and_the_next_one_gets_its_own_checksum(run, tokenizer_dir):
    trainer = fit(run, tokenizer_dir, 2 * STEPS, resume=True)
    assert trainer.global_step == 2 * STEPS
    last = run / "ckpt" / "last.ckpt"
    assert (run / "ckpt" / "last.ckpt.sha256").read_text().split()[0] == hashlib.sha256(last.read_bytes()).hexdigest()
    assert torch.load(last, weights_only=False)["global_step"] == 2 * STEPS


def test_saving_leaves_no_temporary_files(run, tokenizer_dir):
    fit(run, tokenizer_dir, 2 * STEPS, resume=True)
    leftovers = [p.name for p in (run / "ckpt").iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert leftovers == []


def test_without_a_sidecar_an_unreadable_checkpoint_is_reported_as_damaged(run, tokenizer_dir):
    last = run / "ckpt" / "last.ckpt"
    (run / "ckpt" / "last.ckpt.sha256").unlink()  # as written before checksums, or by another tool
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(IntegrityError, match=r"last\.ckpt: torch\.load cannot read it .*damaged or truncated"):
        fit(run, tokenizer_dir, 2 * STEPS, resume=True)


class ReadsCheckpointsItself(SingleDeviceStrategy):
    """Reads the checkpoint file with torch.load, not through its CheckpointIO, as FSDPStrategy does."""

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        return torch.load(checkpoint_path, map_location="cpu", weights_only=False)


def test_a_strategy_that_bypasses_checkpoint_io_is_checked_before_the_first_step(run, tokenizer_dir):
    last = run / "ckpt" / "last.ckpt"
    overwrite(last, inside_the_largest_record(last, 4096), 4096)
    torch.load(last, weights_only=False)  # the damage is silent to torch.load
    with pytest.raises(IntegrityError, match=r"last\.ckpt: its sha256 differs"):
        fit(run, tokenizer_dir, 2 * STEPS, resume=True, strategy=ReadsCheckpointsItself(torch.device("cpu")))


def test_astrai_train_exits_2_instead_of_resuming_from_a_damaged_last_ckpt(tmp_path, tokenizer_dir, capsys):
    rows = tmp_path / "text.jsonl"
    rows.write_text("".join(f'{{"text": "row {i}: the cat sat on the mat, 猫坐在垫子上。"}}\n' for i in range(40)))
    root = tmp_path / "run"

    def astrai_train(steps: int, *extra: str) -> int:
        return main(
            [
                "fit",
                "--model=seq",
                f"--model.model={_tiny_json(tmp_path)}",
                "--data=pretrain",
                f"--data.train={rows}",
                f"--data.tokenizer={tokenizer_dir}",
                "--data.seq_len=16",
                "--data.batch_size=4",
                f"--data.cache_dir={tmp_path / 'cache'}",
                f"--trainer.max_steps={steps}",
                "--trainer.accelerator=cpu",
                f"--trainer.default_root_dir={root}",
                "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false",
                "--model.export.on_fit_end=false",
                *extra,
            ]
        )

    assert astrai_train(3) == 0
    last = root / "checkpoints" / "last.ckpt"
    assert (root / "checkpoints" / "last.ckpt.sha256").is_file()
    overwrite(last, middle(last, 16384), 16384)
    capsys.readouterr()
    assert astrai_train(6, "--ckpt_path=last") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"astrai-train: error: {last}: its sha256 differs") and "damaged" in err
    assert torch.load(last.with_name("epoch=0-step=3.ckpt"), weights_only=False)["global_step"] == 3
