"""GRPO advantages and loss against an independent float64 computation written out here with
plain Python floats (math, statistics), on fixed inputs."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from astrai.train.grpo_module import group_advantages, group_moments, grpo_loss

REWARDS = [1.0, 0.0, 0.5, 0.0, 2.0, 2.0, 2.0, -1.0, 3.0, 0.25]
GROUPS = [0, 0, 0, 0, 1, 1, 1, 2, 2, 3]  # sizes 4, 3 (all equal), 2, 1


def reference_advantages(rewards, groups, scale, eps=1e-4):
    out = []
    for r, g in zip(rewards, groups):
        members = [x for x, h in zip(rewards, groups) if h == g]
        mean = statistics.fmean(members)
        std = statistics.stdev(members) if len(members) > 1 else 0.0  # sample std (n - 1)
        out.append((r - mean) / (std + eps) if scale else r - mean)
    return out


@pytest.mark.parametrize("scale", [True, False])
def test_advantages_match_float64_reference(scale):
    got = group_advantages(torch.tensor(REWARDS, dtype=torch.float64), torch.tensor(GROUPS), scale=scale)
    want = reference_advantages(REWARDS, GROUPS, scale)
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_advantages_properties():
    adv = group_advantages(torch.tensor(REWARDS, dtype=torch.float64), torch.tensor(GROUPS))
    groups = torch.tensor(GROUPS)
    # Equal rewards (group 1) and a lone completion (group 3) carry no signal.
    assert adv[groups == 1].abs().max() == 0 and adv[groups == 3].abs().max() == 0
    # Scaled advantages of a group sum to 0 and have (almost) unit sample std.
    for g in (0, 2):
        a = adv[groups == g]
        assert abs(float(a.sum())) < 1e-9
        assert float(a.std()) == pytest.approx(1.0, rel=1e-3)
    # Better reward, larger advantage within a group.
    assert adv[0] > adv[2] > adv[1] == adv[3]


def test_group_moments_per_group():
    mean, std = group_moments(torch.tensor(REWARDS, dtype=torch.float64), torch.tensor(GROUPS))
    assert mean.tolist() == pytest.approx([0.375, 2.0, 1.0, 0.25])
    assert std.tolist() == pytest.approx([statistics.stdev(REWARDS[:4]), 0.0, statistics.stdev([-1.0, 3.0]), 0.0])


# ---- the loss --------------------------------------------------------------------------------


def fixed_inputs(seed=0, n=4, t=6):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(n, t, generator=g, dtype=torch.float64) * 3
    old = logps + (torch.rand(n, t, generator=g, dtype=torch.float64) - 0.5) * 0.8  # ratios around 0.67..1.5
    ref = logps + (torch.rand(n, t, generator=g, dtype=torch.float64) - 0.5)
    adv = torch.tensor([1.3, -0.7, 0.0, -2.1], dtype=torch.float64)[:n]
    mask = torch.zeros(n, t, dtype=torch.float64)
    for i, length in enumerate([6, 3, 1, 4][:n]):
        start = [0, 2, 4, 1][i]
        mask[i, start : start + length] = 1
    return logps, old, ref, adv, mask


def reference_loss(logps, old, ref, adv, mask, eps, eps_high, kl_coef, aggregation):
    """Per-token -min(rho A, clip(rho) A) + beta * (exp(ref - lp) - (ref - lp) - 1), in Python floats."""
    per_seq, total, count, clipped, kl_sum = [], 0.0, 0, 0, 0.0
    for i in range(len(adv)):
        seq_sum, seq_n = 0.0, 0
        for t in range(len(mask[i])):
            if not mask[i][t]:
                continue
            rho = math.exp(logps[i][t] - old[i][t])
            a = adv[i]
            clip = min(max(rho, 1 - eps), 1 + eps_high)
            value = -min(rho * a, clip * a)
            d = ref[i][t] - logps[i][t]
            kl = math.exp(d) - d - 1
            value += kl_coef * kl
            seq_sum += value
            seq_n += 1
            kl_sum += kl
            clipped += (rho < 1 - eps and a < 0) or (rho > 1 + eps_high and a > 0)
        per_seq.append(seq_sum / max(seq_n, 1))
        total += seq_sum
        count += seq_n
    loss = total / count if aggregation == "token" else sum(per_seq) / len(per_seq)
    return loss, kl_sum / count, clipped / count


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
@pytest.mark.parametrize("eps,eps_high,kl_coef", [(0.2, None, 0.0), (0.1, 0.3, 0.05), (0.2, None, 0.5)])
def test_loss_matches_float64_reference(aggregation, eps, eps_high, kl_coef):
    logps, old, ref, adv, mask = fixed_inputs()
    out = grpo_loss(
        logps, old, adv, mask, ref, epsilon=eps, epsilon_high=eps_high, kl_coef=kl_coef, aggregation=aggregation
    )
    want_loss, want_kl, want_clip = reference_loss(
        logps.tolist(),
        old.tolist(),
        ref.tolist(),
        adv.tolist(),
        mask.tolist(),
        eps,
        eps_high or eps,
        kl_coef,
        aggregation,
    )
    assert float(out.loss) == pytest.approx(want_loss, rel=1e-12, abs=1e-12)
    assert float(out.kl) == pytest.approx(want_kl, rel=1e-12)
    assert float(out.clip_frac) == pytest.approx(want_clip)
    assert 0 < float(out.clip_frac) < 1  # the fixed inputs exercise both clipped and unclipped tokens
    assert int(out.n_tokens) == 14


def test_loss_gradient_matches_analytic_float64():
    """d loss / d logp per token: -A rho where the clip is inactive, 0 where it bites, plus
    beta * (1 - exp(ref - logp)) from the k3 KL; divided by the token count."""
    logps, old, ref, adv, mask = fixed_inputs(seed=3)
    eps, beta = 0.2, 0.1
    lp = logps.clone().requires_grad_(True)
    grpo_loss(lp, old, adv, mask, ref, epsilon=eps, kl_coef=beta).loss.backward()
    n = mask.sum().item()
    for i in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if not mask[i, t]:
                assert lp.grad[i, t] == 0
                continue
            rho = math.exp(logps[i, t] - old[i, t])
            a = float(adv[i])
            active = not ((rho < 1 - eps and a < 0) or (rho > 1 + eps and a > 0))
            surrogate = -a * rho if active else 0.0
            kl = beta * (1 - math.exp(ref[i, t] - logps[i, t]))
            assert float(lp.grad[i, t]) == pytest.approx((surrogate + kl) / n, rel=1e-10, abs=1e-14)


def test_on_policy_first_step_is_the_policy_gradient():
    """With rho = 1 (logps == old) the loss is -mean(A) and its gradient is -A / n per token."""
    logps, _, _, adv, mask = fixed_inputs(seed=1)
    lp = logps.clone().requires_grad_(True)
    out = grpo_loss(lp, logps, adv, mask)
    out.loss.backward()
    n = mask.sum()
    assert float(out.loss.detach()) == pytest.approx(float(-(adv[:, None] * mask).sum() / n))
    assert torch.allclose(lp.grad, -adv[:, None] * mask / n)
    assert float(out.clip_frac) == 0 and float(out.ratio) == pytest.approx(1.0)


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_micro_batches_add_up_to_the_mini_batch(aggregation):
    """Splitting a mini-batch into micro-batches with the mini-batch's normaliser gives the same
    loss and the same gradient (what the module relies on for micro_batch_size)."""
    logps, old, ref, adv, mask = fixed_inputs(seed=2)
    whole = logps.clone().requires_grad_(True)
    full = grpo_loss(whole, old, adv, mask, ref, kl_coef=0.1, aggregation=aggregation)
    full.loss.backward()
    parts = logps.clone().requires_grad_(True)
    norm = mask.sum() if aggregation == "token" else mask.shape[0]
    total = 0.0
    for idx in (torch.tensor([0, 3]), torch.tensor([1]), torch.tensor([2])):
        out = grpo_loss(
            parts[idx], old[idx], adv[idx], mask[idx], ref[idx], kl_coef=0.1, aggregation=aggregation, normalizer=norm
        )
        out.loss.backward()
        total += float(out.loss.detach())
    assert total == pytest.approx(float(full.loss.detach()), rel=1e-12)
    assert torch.allclose(parts.grad, whole.grad, rtol=1e-12, atol=1e-15)


def test_empty_completion_and_bad_aggregation():
    logps, old, _, adv, _ = fixed_inputs()
    out = grpo_loss(logps, old, adv, torch.zeros_like(logps))
    assert float(out.loss) == 0 and int(out.n_tokens) == 0
    with pytest.raises(ValueError, match="aggregation"):
        grpo_loss(logps, old, adv, torch.ones_like(logps), aggregation="mean")
