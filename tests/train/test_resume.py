"""`ckpt_path="last"` resumes exactly: a run stopped half-way and resumed ends with the same
weights, optimizer state and learning rate as an uninterrupted run (same data order)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file
from train_helpers import TINY_MODEL, CycleBatches, make_trainer

from astrai.train.checkpointing import Checkpoint
from astrai.train.cli import cli_main
from astrai.train.data.loader import ResumableDataLoader, ResumableSampler
from astrai.train.pretrain_module import PretrainModule


def _loader():
    # 18 rows, batches of 4: 5 batches per epoch, so the interruption falls mid-epoch.
    ds = CycleBatches(18, 12)
    return ResumableDataLoader(ds, batch_size=4, sampler=ResumableSampler(ds, seed=3))


def _module(tokenizer_dir, optimizer=None, schedule=None, **kw):
    torch.manual_seed(0)
    return PretrainModule(
        model=TINY_MODEL,
        tokenizer=tokenizer_dir,
        optimizer={"lr": 5e-3, **(optimizer or {})},
        schedule={"warmup_steps": 3, **(schedule or {})},
        export={"on_fit_end": False},
        **kw,
    )


class Crash(Callback):
    """Kill the run when it reaches a step, after that step's checkpoint was written."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.at_step:
            raise SimulatedCrash(f"crash at step {self.at_step}")


class SimulatedCrash(RuntimeError):
    pass


def _fit(root: Path, tokenizer_dir, crash_at: int | None = None, resume: bool = False, steps: int = 12, **kw):
    module = _module(tokenizer_dir, **kw)
    callbacks = [Checkpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=0)]
    if crash_at is not None:
        callbacks.append(Crash(crash_at))
    trainer = make_trainer(root, max_steps=steps, callbacks=callbacks, enable_checkpointing=True, limit_val_batches=0)
    try:
        trainer.fit(module, _loader(), ckpt_path="last" if resume else None)
    except SimulatedCrash:
        assert crash_at is not None
    return module, trainer


def _optimizer_state(trainer):
    return trainer.optimizers[0].state_dict()["state"]


@pytest.mark.parametrize(
    "options",
    [
        dict(optimizer={"name": "adamw"}, schedule={"name": "cosine"}),
        dict(optimizer={"name": "muon"}, schedule={"name": "sgdr", "cycle_steps": 4}),
    ],
    ids=["adamw-cosine", "muon-sgdr"],
)
def test_resume_equals_an_uninterrupted_run(tmp_path, tokenizer_dir, options):
    full, full_trainer = _fit(tmp_path / "full", tokenizer_dir, **options)
    _fit(tmp_path / "split", tokenizer_dir, crash_at=7, **options)
    resumed, resumed_trainer = _fit(tmp_path / "split", tokenizer_dir, resume=True, **options)

    assert resumed_trainer.global_step == 12
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
    full_state, resumed_state = _optimizer_state(full_trainer), _optimizer_state(resumed_trainer)
    for index, state in full_state.items():
        for key, value in state.items():
            torch.testing.assert_close(resumed_state[index][key], value, rtol=0, atol=0)
    assert resumed_trainer.optimizers[0].param_groups[0]["lr"] == full_trainer.optimizers[0].param_groups[0]["lr"]


def test_resume_would_differ_without_the_loader_position(tmp_path, tokenizer_dir):
    """The check above can fail: restarting the interrupted epoch from its first batch (what a
    plain DataLoader does) ends elsewhere."""
    full, _ = _fit(tmp_path / "full", tokenizer_dir)
    _fit(tmp_path / "split", tokenizer_dir, crash_at=7)
    ckpt = torch.load(tmp_path / "split" / "ckpt" / "last.ckpt", weights_only=False)
    ckpt["loops"]["fit_loop"]["state_dict"].pop("combined_loader", None)
    torch.save(ckpt, tmp_path / "split" / "ckpt" / "last.ckpt")
    resumed, _ = _fit(tmp_path / "split", tokenizer_dir, resume=True)
    assert not torch.equal(full.model.lm_head.weight, resumed.model.lm_head.weight)


def test_cli_resume_with_ckpt_path_last(tmp_path, tokenizer_dir):
    rows = tmp_path / "text.jsonl"
    rows.write_text("".join(f'{{"text": "row {i}: the cat sat on the mat, 猫坐在垫子上。"}}\n' for i in range(40)))

    def run(root: Path, steps: int, *extra: str) -> dict[str, torch.Tensor]:
        cli_main(
            [
                "fit",
                "--model=seq",
                f"--model.model={_tiny_json(tmp_path)}",
                "--model.optimizer.lr=3e-3",
                "--model.schedule.warmup_steps=2",
                "--model.schedule.decay_steps=10",
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
                *extra,
            ]
        )
        return load_file(root / "export" / "model.safetensors")

    full = run(tmp_path / "full", 10)
    run(tmp_path / "split", 5)
    resumed = run(tmp_path / "split", 10, "--ckpt_path=last")
    for name, value in full.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)


def _tiny_json(tmp_path: Path) -> Path:
    import json

    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY_MODEL))
    return path
