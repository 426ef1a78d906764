"""Trainer gradient clipping (gradient_clip_val) under FSDP, on two CPU processes.

Lightning's FSDP precision plugin refuses clipping by norm; CausalLMModule clips through the
root FullyShardedDataParallel instead, which reduces the norm over every rank's shards. The
FSDP run must then train exactly as one device clipping the same global batch does (same
loss curve, same weights), and both must differ from an unclipped run: else nothing clipped.
Runs as tests/train/test_distributed.py does (see there and tests/train/dist_helpers.py), and
with 2 GPUs also under Lightning's own FSDPStrategy (float32, so one device compares closely).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_distributed import HALF, LOSS_TOL, REPO, STRATEGIES, WEIGHT_TOL, fit_args, weights
from train_helpers import logged_losses, write_text_rows

from astrai.train.cli import cli_main

# So small that the clipped gradients fall below AdamW's eps (1e-8) and the updates shrink:
# plain clipping by a steady factor would hardly show, as AdamW divides it out again.
CLIP = 1e-6


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tokenizer_dir) -> dict[str, Path | str]:
    return write_text_rows(tmp_path_factory.mktemp("clip_inputs"), tokenizer_dir)


def one_device(inputs, root: Path, accelerator: str, *extra: str) -> Path:
    cli_main(fit_args(inputs, root, HALF, 4) + [f"--trainer.accelerator={accelerator}", "--trainer.devices=1", *extra])
    return root


# CPU: FSDP over gloo through dist_helpers; GPU (2 or more): Lightning's own FSDPStrategy over NCCL.
@pytest.fixture(
    scope="module",
    params=["cpu", pytest.param("gpu", marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs"))],
)
def fsdp_clipped(request, inputs, tmp_path_factory) -> tuple[Path, str]:
    accelerator = request.param
    root = tmp_path_factory.mktemp(f"fsdp_clipped_{accelerator}")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")])),
    }
    strategy = STRATEGIES["fsdp"] if accelerator == "cpu" else "fsdp"
    args = fit_args(inputs, root, HALF, 2) + [
        f"--trainer.accelerator={accelerator}",
        "--trainer.devices=2",
        f"--trainer.strategy={strategy}",
        f"--trainer.gradient_clip_val={CLIP}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "astrai.train.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Starting with 2 processes" in proc.stdout + proc.stderr
    return root, accelerator


@pytest.mark.slow
def test_fsdp_clips_like_one_device_and_clipping_changes_training(inputs, fsdp_clipped, tmp_path):
    sharded_root, accelerator = fsdp_clipped
    clipped = one_device(inputs, tmp_path / "clipped", accelerator, f"--trainer.gradient_clip_val={CLIP}")
    unclipped = one_device(inputs, tmp_path / "unclipped", accelerator)
    ref, got = logged_losses(clipped), logged_losses(sharded_root)
    assert sorted(got) == list(range(HALF))
    for step in range(HALF):
        assert got[step] == pytest.approx(ref[step], abs=LOSS_TOL), f"step {step}: {got} vs {ref}"
    expected, sharded, free = (weights(root / "export") for root in (clipped, sharded_root, unclipped))
    for name, value in expected.items():
        torch.testing.assert_close(sharded[name], value, rtol=0, atol=WEIGHT_TOL, msg=name)
    # Clipping must have changed the run by far more than the tolerance above allows (measured: 0.014).
    assert max((free[n] - v).abs().max() for n, v in expected.items()) > 100 * WEIGHT_TOL
