"""bf16 weights with gradient accumulation: the micro-batches' gradients are summed in float32
and rounded to bf16 once per optimizer step (astrai.train.grad_accumulation)."""

from __future__ import annotations

import os

import pytest
import torch
from data_helpers import word_tokenizer, write_jsonl
from torch.utils.data import DataLoader
from train_helpers import TINY_MODEL, CycleBatches, make_trainer

from astrai.train.data.grpo import GRPODataModule
from astrai.train.grad_accumulation import Float32Grads
from astrai.train.grpo_module import GRPOModule
from astrai.train.pretrain_module import PretrainModule

SMALL = 2.0**-9  # a quarter of bf16's spacing at 1.0 (2**-7): lost when added to 1 in bf16


def _backward(w: torch.Tensor, x: float) -> None:
    (w * torch.full_like(w, x)).sum().backward()  # d/dw = x in every element


def test_float32_sum_keeps_what_bf16_accumulation_rounds_away():
    w = torch.ones(4, dtype=torch.bfloat16, requires_grad=True)
    unused = torch.ones(2, dtype=torch.bfloat16, requires_grad=True)
    sums = Float32Grads([w, unused])
    averaged = []
    for x in (1.0, SMALL, SMALL, SMALL):
        _backward(w, x)
        sums.collect()
        assert w.grad is None  # moved into the float32 sum
    sums.release(averaged.append)
    # 1 + 3 * 2**-9 = 1.00586 rounds once, to bf16's nearest value 1 + 2**-7
    assert torch.equal(w.grad, torch.full((4,), 1 + 2**-7, dtype=torch.bfloat16))
    assert unused.grad is None  # no gradient came, none is invented
    assert len(averaged) == 1 and averaged[0].dtype == torch.float32
    # what autograd's own bf16 accumulation gives: every small addition lost
    plain = torch.ones(4, dtype=torch.bfloat16, requires_grad=True)
    for x in (1.0, SMALL, SMALL, SMALL):
        _backward(plain, x)
    assert torch.equal(plain.grad, torch.ones(4, dtype=torch.bfloat16))
    # after the step (zero_grad) the next sum starts from zero; a release with nothing
    # collected changes nothing
    w.grad = None
    _backward(w, 0.5)
    sums.collect()
    sums.release()
    assert torch.equal(w.grad, torch.full((4,), 0.5, dtype=torch.bfloat16))
    sums.release(averaged.append)
    assert len(averaged) == 1


class Recording:
    """Records each micro-batch's bf16 gradients (on_after_backward runs right after each
    backward, before they are moved into the float32 sum), then checks what the optimizer
    step gets: the exact sum rounded once, where adding in bf16 would round at every step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.micro: list[dict[str, torch.Tensor]] = []
        self.steps: list[int] = []  # micro-batches per optimizer step
        self.naive_differs = False

    def on_after_backward(self):
        self.micro.append({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None})
        super().on_after_backward()

    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        self.steps.append(len(self.micro))
        for name, p in self.model.named_parameters():
            parts = [m[name] for m in self.micro]
            exact = torch.stack([g.double() for g in parts]).sum(0)
            assert p.grad.dtype == torch.bfloat16
            # one rounding of the exact sum: within half a bf16 spacing (relative 2**-9), or 1e-30
            torch.testing.assert_close(p.grad.double(), exact, rtol=2**-8, atol=1e-30)
            naive = parts[0]
            for g in parts[1:]:
                naive = naive + g  # bf16 + bf16, rounded at each addition
            self.naive_differs |= not torch.equal(naive, p.grad)
        self.micro = []


class RecordingPretrainModule(Recording, PretrainModule):
    pass


class RecordingGRPOModule(Recording, GRPOModule):
    pass


def test_lightning_accumulation_with_bf16_weights(tmp_path):
    torch.manual_seed(0)
    module = RecordingPretrainModule(
        model={"vocab_size": 320, **TINY_MODEL},
        param_dtype="bfloat16",
        optimizer={"lr": 1e-2},
        export={"on_fit_end": False},
    )
    loader = DataLoader(CycleBatches(24, 16), batch_size=2, shuffle=True)
    trainer = make_trainer(tmp_path, max_steps=4, accumulate_grad_batches=3)
    trainer.fit(module, loader)
    assert module.steps == [3, 3, 3, 3]
    assert module.naive_differs  # the float32 sum mattered somewhere
    assert {p.dtype for p in module.model.parameters()} == {torch.bfloat16}


def test_grpo_micro_batches_with_bf16_weights(tmp_path):
    """GRPO's own micro-batches (manual optimisation) go through the same float32 sum."""
    tok = word_tokenizer(tmp_path / "tok")
    rows = [{"prompt": p, "reference": "good one two"} for p in ("what is one", "hi", "yo", "what is a")]
    data = GRPODataModule(
        tok, write_jsonl(tmp_path / "grpo.jsonl", rows), batch_size=2, cache_dir=str(tmp_path / "cache")
    )
    torch.manual_seed(0)
    module = RecordingGRPOModule(
        model={**TINY_MODEL, "max_len": 64},
        tokenizer=tok,
        group_size=4,
        max_new_tokens=3,
        rewards=[{"fn": "astrai.train.rewards.similarity"}],
        micro_batch_size=2,
        param_dtype="bfloat16",
        max_grad_norm=None,  # unclipped: the sum itself
        optimizer={"lr": 1e-2},
        export={"on_fit_end": False},
    )
    trainer = make_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(module, data)
    assert module.steps == [4, 4]  # 2 prompts x 4 completions in micro-batches of 2
    assert module.naive_differs


def test_bf16_accumulation_is_refused_under_fsdp(tmp_path):
    """Lightning's FSDP strategy (one CPU process, tests/train/dist_helpers.py): the float32 sum
    does not handle sharded gradients, so the run stops at start, naming the settings."""
    from dist_helpers import CPUFSDPStrategy

    module = PretrainModule(
        model={"vocab_size": 320, **TINY_MODEL}, param_dtype="bfloat16", export={"on_fit_end": False}
    )
    loader = DataLoader(CycleBatches(8, 16), batch_size=2)
    trainer = make_trainer(tmp_path, max_steps=2, accumulate_grad_batches=2, strategy=CPUFSDPStrategy())
    environ = dict(os.environ)
    try:
        with pytest.raises(ValueError, match=r"bfloat16 with trainer.accumulate_grad_batches \(2\) under FSDP"):
            trainer.fit(module, loader)
    finally:  # neither the one-process group nor Lightning's MASTER_PORT & co. may leak into later tests
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)


@pytest.mark.parametrize("with_bf16", [True, False], ids=["two-dtypes", "float32-only"])
def test_released_gradients_outlive_the_next_sum(with_bf16):
    """Each released gradient is its own tensor, not a view of the float32 buffer, which the
    next sum zeroes and refills: with parameters of two dtypes (a cast per parameter) and with
    float32 ones only (where a cast of the buffer to its own dtype would be the buffer)."""
    w16 = torch.ones(3, dtype=torch.bfloat16, requires_grad=True)
    w32 = torch.ones(2, dtype=torch.float32, requires_grad=True)
    sums = Float32Grads([w16, w32] if with_bf16 else [w32])
    for x in (1.0, SMALL):
        if with_bf16:
            _backward(w16, x)
        _backward(w32, x)
        sums.collect()
    sums.release()
    assert w32.grad.dtype == torch.float32 and (not with_bf16 or w16.grad.dtype == torch.bfloat16)
    assert torch.equal(w32.grad, torch.full((2,), 1 + SMALL))  # float32 keeps the small part
    released = w32.grad
    w32.grad = None  # the optimizer's zero_grad; the tensor it held lives on (an optimizer may keep it)
    _backward(w32, 3.0)
    sums.collect()
    assert torch.equal(released, torch.full((2,), 1 + SMALL))
