"""GRPO's math as pure functions: group-relative advantages and the clipped policy loss with
its k3 KL term (the formulas are in grpo_module.py's docstring). Kept apart from the Lightning
module so they read, and are tested, on their own; grpo_module.py imports them from here.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

AGGREGATIONS = ("token", "sequence")


def group_moments(rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group (ids 0..G-1): the mean and the sample standard deviation (n - 1) of its
    completions' rewards (std 0 for a group of one)."""
    n_groups = int(group_ids.max()) + 1
    zeros = rewards.new_zeros(n_groups)
    counts = zeros.index_add(0, group_ids, torch.ones_like(rewards))
    mean = zeros.index_add(0, group_ids, rewards) / counts.clamp(min=1)
    var = zeros.index_add(0, group_ids, (rewards - mean[group_ids]) ** 2) / (counts - 1).clamp(min=1)
    return mean, var.sqrt()


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, scale: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """(r - group mean) / (group std + eps), or r - group mean without ``scale``. A group whose
    completions all scored the same gives advantage 0: it carries no signal about what is better."""
    mean, std = group_moments(rewards, group_ids)
    centered = rewards - mean[group_ids]
    return centered / (std[group_ids] + eps) if scale else centered


class GRPOLoss(NamedTuple):
    loss: torch.Tensor  # what is minimised
    kl: torch.Tensor  # mean k3 KL per completion token (detached; 0 without a reference)
    clip_frac: torch.Tensor  # share of completion tokens whose ratio was clipped (detached)
    ratio: torch.Tensor  # mean probability ratio (detached)
    n_tokens: torch.Tensor  # completion tokens in this call


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logps: torch.Tensor | None = None,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    kl_coef: float = 0.0,
    aggregation: Literal["token", "sequence"] = "token",
    normalizer: float | torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> GRPOLoss:
    """Clipped policy-gradient loss with an optional KL penalty (see module docstring).

    logps, old_logps, ref_logps, mask: (N, T) per-token values, mask 1 on completion tokens;
    advantages: (N,). ``normalizer`` is what the summed loss is divided by: by default this
    call's completion tokens (token) or sequences (sequence); pass the mini-batch's count when
    a mini-batch is split into micro-batches, so the gradients add up to the mini-batch's.
    ``weights``: (N, T) per-token importance weights on the clipped term (decoupled PPO: the
    proximal over the behaviour policy, for samples of older weights); None is all ones.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    adv = advantages.to(logps.dtype)[:, None]
    high = epsilon if epsilon_high is None else epsilon_high
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - epsilon, 1 + high) * adv)
    if weights is not None:
        per_token = per_token * weights
    kl = torch.zeros_like(logps)
    if ref_logps is not None:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        if kl_coef:
            per_token = per_token + kl_coef * kl
    lengths = mask.sum(-1)
    if aggregation == "token":
        total = (per_token * mask).sum()
        denominator = lengths.sum() if normalizer is None else normalizer
    else:
        total = ((per_token * mask).sum(-1) / lengths.clamp(min=1)).sum()
        denominator = logps.shape[0] if normalizer is None else normalizer
    if torch.is_tensor(denominator):
        loss = total / denominator.to(logps.dtype).clamp(min=1)
    else:  # a host number divides as is: a device tensor made from it would be a blocking copy
        loss = total / max(float(denominator), 1.0)
    with torch.no_grad():
        n = lengths.sum()
        clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + high) & (adv > 0))
        mean = lambda x: (x * mask).sum() / n.clamp(min=1)  # noqa: E731
        return GRPOLoss(loss, mean(kl), mean(clipped.to(mask.dtype)), mean(ratio), n)
