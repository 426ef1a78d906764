"""Loss functions against formulas written out here in float64 (math module / plain loops)."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.text import Perplexity as ReferencePerplexity

from astrai.train import token_nll as token_nll_module
from astrai.train.losses import IGNORE_INDEX, dpo_loss, sequence_logps, token_loss
from astrai.train.metrics import Perplexity
from astrai.train.token_nll import token_nll


def _log_softmax64(row: list[float]) -> list[float]:
    top = max(row)
    lse = top + math.log(sum(math.exp(x - top) for x in row))
    return [x - lse for x in row]


def _batch(b=3, t=5, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g) * 3
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :2] = IGNORE_INDEX
    labels[-1, -1] = IGNORE_INDEX
    return logits, labels


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_token_loss_matches_float64_formula(smoothing):
    logits, labels = _batch()
    out = token_loss(logits, labels, label_smoothing=smoothing)
    total, nll, n = 0.0, 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            y = int(labels[b, t])
            if y == IGNORE_INDEX:
                continue
            logp = _log_softmax64(logits[b, t].double().tolist())
            uniform = -sum(logp) / len(logp)
            total += (1 - smoothing) * -logp[y] + smoothing * uniform
            nll += -logp[y]
            n += 1
    assert int(out.n_tokens) == n
    assert out.loss.item() == pytest.approx(total / n, rel=1e-5)
    assert out.nll_sum.item() == pytest.approx(nll, rel=1e-5)
    assert not out.nll_sum.requires_grad


def test_token_loss_without_labels_is_zero_not_nan():
    logits = torch.randn(2, 4, 7, requires_grad=True)
    labels = torch.full((2, 4), IGNORE_INDEX)
    out = token_loss(logits, labels)
    out.loss.backward()
    assert out.loss.item() == 0.0 and int(out.n_tokens) == 0
    assert torch.isfinite(logits.grad).all() and not logits.grad.any()


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_token_nll_gradient_matches_float64_autograd_across_chunks(smoothing, monkeypatch):
    """The chunked backward (softmax recomputed per chunk) against autograd through the dense
    formula in float64; chunks of 3 rows over 14 rows: several chunks and a short last one."""
    monkeypatch.setattr(token_nll_module, "_CHUNK_ELEMENTS", 3 * 11)
    logits, labels = _batch(b=2, t=7, v=11, seed=3)
    weights = torch.rand(14, generator=torch.Generator().manual_seed(4))  # an upstream gradient per row
    x = logits.reshape(-1, 11).clone().requires_grad_()
    (token_nll(x, labels.reshape(-1), smoothing) * weights).sum().backward()
    x64 = logits.reshape(-1, 11).double().requires_grad_()
    logp = torch.log_softmax(x64, -1)
    keep = labels.reshape(-1) != IGNORE_INDEX
    nll = -logp.gather(1, labels.reshape(-1).clamp(min=0)[:, None])[:, 0]
    per_row = (1 - smoothing) * nll + smoothing * -logp.mean(-1)
    (torch.where(keep, per_row, 0.0) * weights.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-7)
    assert not x.grad[~keep].any()  # ignored rows get no gradient


def test_token_loss_keeps_no_float32_copy_of_bf16_logits():
    """The point of the chunked loss: backward keeps the bf16 logits and per-row numbers only,
    and the gradient comes back in bf16."""
    logits, labels = _batch(b=2, t=16, v=301, seed=5)
    logits = logits.bfloat16().requires_grad_()
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append((t.shape, t.dtype)) or t, lambda t: t):
        out = token_loss(logits, labels)
    assert not [s for s, d in shapes if d == torch.float32 and s.numel() >= logits.numel()], shapes
    out.loss.backward()
    assert logits.grad.dtype == torch.bfloat16 and logits.grad.shape == logits.shape


def test_token_nll_rejects_unflattened_input():
    with pytest.raises(ValueError, match="rows, vocab"):
        token_nll(torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long))


def test_sequence_logps_sums_labelled_positions_only():
    logits, labels = _batch(seed=1)
    got = sequence_logps(logits, labels)
    for b in range(labels.shape[0]):
        expected = sum(
            _log_softmax64(logits[b, t].double().tolist())[int(y)]
            for t, y in enumerate(labels[b])
            if int(y) != IGNORE_INDEX
        )
        assert got[b].item() == pytest.approx(expected, rel=1e-5)


def _dpo_reference(pc, pr, rc, rr, beta, loss_type, eps):
    h = (pc - rc) - (pr - rr)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    log_sigmoid = lambda x: -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))  # noqa: E731
    return -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)


@pytest.mark.parametrize(
    "loss_type,beta,eps", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2), ("ipo", 0.1, 0.0), ("ipo", 1.0, 0.0)]
)
def test_dpo_loss_matches_float64_formula(loss_type, beta, eps):
    g = torch.Generator().manual_seed(2)
    pc, pr, rc, rr = (torch.randn(6, generator=g, dtype=torch.float64) * 20 - 40 for _ in range(4))
    out = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
    for i in range(6):
        args = (pc[i].item(), pr[i].item(), rc[i].item(), rr[i].item())
        assert out.losses[i].item() == pytest.approx(_dpo_reference(*args, beta, loss_type, eps), rel=1e-9, abs=1e-12)
        assert out.chosen_rewards[i].item() == pytest.approx(beta * (args[0] - args[2]), rel=1e-12)
        assert out.rejected_rewards[i].item() == pytest.approx(beta * (args[1] - args[3]), rel=1e-12)


def test_dpo_loss_gradient_points_to_the_chosen_reply():
    pc = torch.tensor([-10.0], requires_grad=True)
    pr = torch.tensor([-10.0], requires_grad=True)
    ref = torch.tensor([-10.0])
    out = dpo_loss(pc, pr, ref, ref, beta=0.1)
    assert out.losses.item() == pytest.approx(math.log(2))  # policy == reference
    out.losses.sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # descending raises the chosen, lowers the rejected


def test_dpo_loss_rejects_bad_settings():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(x, x, x, x, loss_type="hinge")
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, beta=0.0)


def test_perplexity_metric_matches_torchmetrics_reference():
    ours, ref = Perplexity(), ReferencePerplexity(ignore_index=IGNORE_INDEX)
    for seed in range(3):  # batches with different numbers of labelled tokens
        logits, labels = _batch(b=2 + seed, seed=seed)
        out = token_loss(logits, labels)
        ours.update(out.nll_sum / out.n_tokens, weight=out.n_tokens)
        ref.update(logits, labels)
    assert ours.compute().item() == pytest.approx(ref.compute().item(), rel=1e-5)
