"""Per-token log-probs (grpo_logps.token_logps, losses.label_logps) when the model is compiled:
the compiled dense formula gives the chunked token_nll path's values and gradients, and one
compile serves every length.

Compiling on a CPU is slow (inductor builds C++), so the model here stays eager (only the
log-softmax is compiled) and one compile serves all the cases.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters
from train_helpers import TINY_MODEL

from astrai.core.config import ModelConfig
from astrai.core.transformer import CausalLM
from astrai.train.grpo_logps import BatchLayout, token_logps
from astrai.train.losses import IGNORE_INDEX, _dense_label_logps, label_logps, sequence_logps

VOCAB = 61


@pytest.fixture(scope="module")
def compiles():
    """Dynamo's frame count, from a fresh start, over the module's tests."""
    torch._dynamo.reset()
    counters.clear()
    yield counters["frames"]
    torch._dynamo.reset()


def _batch(rows=4, width=12, seed=0) -> dict:
    """Right-padded rows of different lengths; labels on each row's completion only."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, width), generator=g)
    mask = torch.zeros(rows, width, dtype=torch.long)
    labels = torch.full((rows, width), IGNORE_INDEX)
    for r in range(rows):
        length = width - 2 * r
        mask[r, :length] = 1
        labels[r, 2 : length - 1] = ids[r, 3:length]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _logps_and_grads(model, data, idx, dynamic):
    model.zero_grad()
    lp = token_logps(model, data, BatchLayout(data).cut(idx), dynamic=dynamic)
    weights = torch.linspace(-1, 2, lp.numel()).view(lp.shape)  # a gradient that differs by position
    (lp * weights).sum().backward()
    return lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_compiled_token_logps_match_the_chunked_ones_and_their_gradients(compiles):
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(vocab_size=VOCAB, **{**TINY_MODEL, "init_std": 0.5}))
    data = _batch()
    for idx in (torch.arange(4), torch.tensor([2, 3])):  # two lengths: 12 and 8
        eager, eager_grads = _logps_and_grads(model, data, idx, dynamic=False)
        compiled, compiled_grads = _logps_and_grads(model, data, idx, dynamic=True)
        labelled = data["labels"][idx] != IGNORE_INDEX
        assert (eager[~labelled] == 0).all() and (compiled[~labelled] == 0).all()
        assert (eager[labelled] < 0).all()  # the test compares real log-probs
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
        for name, grad in eager_grads.items():  # float32 rounding, summed in another order
            scale = float(grad.abs().max())
            torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-5, atol=2e-6 * scale, msg=name)
    assert compiles["total"] == 1  # compiled once for both lengths


def test_compiled_label_logps_give_zero_and_no_gradient_where_ignored(compiles):
    g = torch.Generator().manual_seed(1)
    for rows in (9, 23):  # more row counts, still the one compile
        logits = (torch.randn(rows, VOCAB, generator=g) * 4).requires_grad_()
        labels = torch.randint(0, VOCAB, (rows,), generator=g)
        labels[::3] = IGNORE_INDEX
        weights = torch.randn(rows, generator=g)
        eager, compiled = (label_logps(logits, labels, compiled=c) for c in (False, True))
        (eager_grad,) = torch.autograd.grad((eager * weights).sum(), logits)
        (compiled_grad,) = torch.autograd.grad((compiled * weights).sum(), logits)
        assert not compiled[::3].any() and not compiled_grad[::3].any()
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-5, atol=1e-7)
        # DPO's per-sequence sums go the same way (rows of the (batch, T) labels flattened).
        batched = logits[: rows - rows % 2].view(2, -1, VOCAB)
        cut = labels[: rows - rows % 2].view(2, -1)
        torch.testing.assert_close(sequence_logps(batched, cut, compiled=True), sequence_logps(batched, cut))
    assert compiles["total"] == 1


def test_compiled_label_logps_keep_no_float32_copy_of_bf16_logits():
    """What makes it worth compiling: the dense formula saves float32 (rows, vocab) tensors for
    backward; compiled, only the bf16 logits and per-row statistics are kept."""
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(40, 301, generator=g) * 4).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 301, (40,), generator=g)
    labels[::5] = IGNORE_INDEX

    def saved(fn):
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            out = fn(logits, labels)
        big = [t for t in kept if t.numel() >= logits.numel() and t.dtype == torch.float32]
        return out, big

    dense, dense_big = saved(_dense_label_logps)
    compiled, compiled_big = saved(lambda x, y: label_logps(x, y, compiled=True))
    assert dense_big, "the dense formula keeps a float32 copy (else the test proves nothing)"
    assert not compiled_big
    torch.testing.assert_close(compiled, dense, rtol=1e-5, atol=1e-5)
    assert compiled.dtype == torch.float32 and not compiled[::5].any()


def test_micro_batches_cut_on_the_host_equal_the_cut_read_from_the_device():
    """BatchLayout reads the batch's lengths and labelled positions once; its cuts (any rows, in
    any order) hold the length and labelled positions read from the device tensors themselves,
    and give the log-probs of a float64 forward of each row."""
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(vocab_size=VOCAB, **{**TINY_MODEL, "init_std": 0.5}))
    data = _batch(rows=5, width=14, seed=3)
    layout = BatchLayout(data)
    assert layout.num_rows == 5 and layout.lengths.tolist() == [14, 12, 10, 8, 6]
    assert layout.labelled_tokens() == int((data["labels"] != IGNORE_INDEX).sum())
    reference = copy.deepcopy(model).double()
    for rows in ([3, 4], [4, 0, 2], [1], [0, 1, 2, 3, 4]):
        idx = torch.tensor(rows)
        cut = layout.cut(idx)
        length = int(data["attention_mask"][idx].sum(1).max())
        labelled = data["labels"][idx, :length] != IGNORE_INDEX
        assert cut.length == length == max(14 - 2 * r for r in rows)
        assert torch.equal(cut.index, idx) and torch.equal(cut.flat, labelled.reshape(-1).nonzero().squeeze(1))
        assert layout.labelled_tokens(idx) == int(labelled.sum())
        lp = token_logps(model, data, cut)
        for i, r in enumerate(rows):
            with torch.no_grad():
                logits = reference(data["input_ids"][r : r + 1, : 14 - 2 * r])[0]
            labels = data["labels"][r, : 14 - 2 * r]
            keep = labels != IGNORE_INDEX
            expected = logits.log_softmax(-1)[keep].gather(1, labels[keep][:, None])[:, 0]
            torch.testing.assert_close(
                lp[i][data["labels"][r] != IGNORE_INDEX].double(), expected, rtol=1e-5, atol=1e-5
            )
            assert not lp[i][data["labels"][r] == IGNORE_INDEX].any()
