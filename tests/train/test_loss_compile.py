"""The token loss under torch.compile (compile=True) and a training step free of host syncs.

Compiling on a CPU is slow (inductor builds C++), so the CPU cases here are few and tiny.
"""

from __future__ import annotations

import copy

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset
from train_helpers import TINY_MODEL, CycleBatches, make_trainer

from astrai.train.dpo_module import DPOModule
from astrai.train.losses import IGNORE_INDEX, _dense_token_loss, compiled_token_loss, token_loss
from astrai.train.metrics import HostCopy
from astrai.train.pretrain_module import PretrainModule
from astrai.train.sft_module import SFTModule


def _logits_labels(dtype, b=2, t=24, v=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, t, v, generator=g) * 4).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :5] = IGNORE_INDEX
    labels[1, -3:] = IGNORE_INDEX
    return logits, labels


def _loss_and_grad(fn, logits, labels, smoothing):
    x = logits.detach().clone().requires_grad_()
    out = fn(x, labels, smoothing)
    out.loss.backward()
    return out, x.grad


@pytest.mark.parametrize("dtype,smoothing", [(torch.float64, 0.1), (torch.float32, 0.0)])
def test_compiled_token_loss_matches_the_eager_loss_and_gradient(dtype, smoothing):
    logits, labels = _logits_labels(dtype)
    eager, eager_grad = _loss_and_grad(token_loss, logits, labels, smoothing)
    compiled, compiled_grad = _loss_and_grad(compiled_token_loss(), logits, labels, smoothing)
    # Both compute in float32 (token_loss upcasts; float64 input is rounded to it too), so they
    # agree to float32 rounding, with a different summation order.
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(compiled.nll_sum, eager.nll_sum, rtol=1e-6, atol=1e-6)
    assert int(compiled.n_tokens) == int(eager.n_tokens) == int((labels != IGNORE_INDEX).sum())
    assert compiled_grad.dtype == dtype
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-5, atol=1e-7)
    assert not compiled_grad[0, :5].any()  # ignored positions get no gradient


def test_compiled_token_loss_keeps_no_float32_copy_of_bf16_logits():
    """What makes it worth compiling: eager cross-entropy saves float32 (tokens, vocab) tensors
    for backward (the upcast logits' log-softmax); compiled, only the bf16 logits and per-row
    statistics are kept. The loss still matches float64 arithmetic on the same bf16 values."""
    logits, labels = _logits_labels(torch.bfloat16, t=32, v=301, seed=1)
    saved = {}

    def record(fn):
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append((t.shape, t.dtype)) or t, lambda t: t):
            out = fn(logits, labels)
        saved[fn] = shapes
        return out

    dense, eager, compiled = record(_dense_token_loss), record(token_loss), record(compiled_token_loss())
    big = lambda shapes: [s for s, d in shapes if s.numel() >= logits.numel() and d == torch.float32]  # noqa: E731
    assert big(saved[_dense_token_loss]), "the dense formula keeps a float32 copy (else the test proves nothing)"
    assert not big(saved[compiled_token_loss()])
    assert not big(saved[token_loss])  # the eager chunked path (token_nll.py)
    assert dense.loss.item() == pytest.approx(eager.loss.item(), rel=1e-6)

    keep = labels != IGNORE_INDEX
    nll64 = -torch.log_softmax(logits.detach().double(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    expected = nll64[keep].mean().item()
    assert compiled.loss.item() == pytest.approx(expected, rel=1e-5)
    assert eager.loss.item() == pytest.approx(expected, rel=1e-5)
    g_eager = torch.autograd.grad(eager.loss, logits)[0]
    g_compiled = torch.autograd.grad(compiled.loss, logits)[0]
    assert g_compiled.dtype == torch.bfloat16
    torch.testing.assert_close(g_compiled.float(), g_eager.float(), rtol=1e-2, atol=1e-5)  # bf16 rounding


# -- no host synchronisation in the training step (CUDA only) --------------------------------
class _SyncsAreErrors(Callback):
    """From the second batch on (the first one checks token ids against the vocabulary once),
    any synchronising CUDA call inside the training step raises."""

    def __init__(self):
        self.strict_steps = 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx > 0:
            torch.cuda.set_sync_debug_mode("error")
            self.strict_steps += 1

    def on_train_batch_end(self, *args):
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device synchronisation exists on CUDA only")
@pytest.mark.parametrize(
    "options", [dict(), dict(compile=True), dict(param_dtype="bfloat16")], ids=["eager", "compiled", "bf16-params"]
)
def test_training_step_never_waits_for_the_device(tmp_path, options):
    torch.manual_seed(0)
    module = PretrainModule(
        model={"vocab_size": 320, **TINY_MODEL},
        peak_flops=1e12,
        optimizer={"lr": 1e-2},
        export={"on_fit_end": False},
        **options,
    )
    strict = _SyncsAreErrors()
    trainer = make_trainer(tmp_path, max_steps=4, accelerator="gpu", precision="bf16-mixed", callbacks=[strict])
    try:
        trainer.fit(module, DataLoader(CycleBatches(16, 16), batch_size=4))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert strict.strict_steps == 3
    assert trainer.callback_metrics["train/loss"] > 0  # read after the run: the values were logged


class _Pairs(Dataset):
    """DPO pairs: a periodic row as the chosen reply, another row's as the rejected one."""

    def __init__(self, n_rows: int = 16, seq_len: int = 16):
        self.rows = CycleBatches(n_rows, seq_len).rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        out = {}
        for side, row in (("chosen", self.rows[i]), ("rejected", self.rows[(i + 3) % len(self.rows)])):
            out.update(
                {
                    f"{side}_input_ids": row["input_ids"],
                    f"{side}_labels": row["labels"],
                    f"{side}_attention_mask": torch.ones_like(row["input_ids"]),
                }
            )
        return out


def _fine_tuning(kind: str):
    torch.manual_seed(0)
    module = {"sft": SFTModule, "dpo": DPOModule}[kind]
    return (
        module(
            model={"vocab_size": 320, **TINY_MODEL},
            peak_flops=1e12,
            optimizer={"lr": 1e-2},
            export={"on_fit_end": False},
        ),
        DataLoader(CycleBatches(16, 16) if kind == "sft" else _Pairs(), batch_size=4),
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device synchronisation exists on CUDA only")
@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_fine_tuning_steps_never_wait_for_the_device(tmp_path, kind):
    module, data = _fine_tuning(kind)
    strict = _SyncsAreErrors()
    trainer = make_trainer(tmp_path, max_steps=4, accelerator="gpu", precision="bf16-mixed", callbacks=[strict])
    try:
        trainer.fit(module, data)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert strict.strict_steps == 3
    assert trainer.callback_metrics["train/loss"] > 0


@pytest.mark.parametrize("kind,shown", [("sft", {"loss"}), ("dpo", {"loss", "reward_acc"})])
def test_fine_tuning_progress_bar_shows_host_values(tmp_path, kind, shown):
    module, data = _fine_tuning(kind)
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.fit(module, data)
    bar = trainer.progress_bar_metrics
    assert shown <= set(bar) and not any(k.startswith("train/") for k in bar), bar
    # The bar's loss is this rank's training loss (on a CPU, the current step's).
    assert bar["loss"] == pytest.approx(float(trainer.callback_metrics["train/loss"]), rel=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="asynchronous device-to-host copies exist on CUDA only")
def test_host_copy_gives_finished_values_without_waiting():
    # Made before the strict section: torch.tensor(x, device="cuda") is itself a blocking copy
    # from host memory, which the sync debug mode would (rightly) flag.
    values = torch.tensor([1.0, 2.0, 3.0], device="cuda")
    shown = HostCopy()
    # The first push allocates the pinned buffers (in training: the first, unchecked step).
    first = shown.push(values[0])
    torch.cuda.set_sync_debug_mode("error")
    try:
        second = shown.push(values[1])
        shown.push(values[2])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert first is None  # nothing had finished before the first copy was queued
    assert second is None or second.item() == 1.0  # a finished copy, or none yet: never a wait
    torch.cuda.synchronize()
    latest = shown.push(values[0] * 4)
    assert latest.device.type == "cpu" and latest.item() == 3.0
    assert copy.deepcopy(shown).push(torch.tensor(4.0, device="cuda")) is None  # copies start afresh


def test_host_copy_passes_cpu_values_through():
    assert HostCopy().push(torch.tensor(1.5, dtype=torch.bfloat16)).item() == 1.5
