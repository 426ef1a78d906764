"""The numbers a GRPO step logs under train/ (named in GRPOModule's docstring), computed apart
from the Lightning module (grpo_module.py), which logs them:

- ``rollout_stats``: what an online batch's episodes were like (rewards, lengths, speed, lag);
- ``in_step_stats``: logp_gap and the decoupled-PPO weights of a micro-batch, summed as it
  trains, when the old log-probs come from the training forward itself;
- ``step_metrics``: the step's rewards, their spread within groups and the loss terms.

Sums stay device tensors: reading a value back per micro-batch would wait for the device each time.
"""

from __future__ import annotations

import torch

from .grpo_async import behaviour_weights
from .grpo_loss import group_moments
from .rollout import Rollout


def rollout_stats(rollout: Rollout, parts: dict[str, torch.Tensor], step: int) -> dict:
    """Each reward's mean, completion lengths, the share cut at max_new_tokens, generation
    speed, and how many optimizer steps the oldest sampling weights are behind ``step``."""
    lengths = torch.tensor([len(c) for c in rollout.completion_ids], dtype=torch.float32)
    stats = {f"reward/{name}": values.mean() for name, values in parts.items()}
    stats.update(
        {
            "completion_len": lengths.mean(),
            "completion_len_max": lengths.max(),
            "truncated": torch.tensor([r == "length" for r in rollout.finish_reasons], dtype=torch.float32).mean(),
            "rollout_tokens_per_sec": rollout.num_tokens / max(rollout.seconds, 1e-9),
            "weights_lag": float(step - min(rollout.versions)),
        }
    )
    return stats


def in_step_stats(old_rows, engine_logps, stale, mask, idx, sums: dict, weight_cap: float):
    """A micro-batch's share of logp_gap and, for rows of older weights, their decoupled-PPO
    weights (returned) when the old log-probs come from the training forward."""
    if engine_logps is None:
        return None
    rows_mask = mask[idx]
    sums["logp_gap"] += ((old_rows - engine_logps[idx]).abs() * rows_mask).sum()
    if stale is None:
        return None
    weights = behaviour_weights(old_rows, engine_logps[idx], stale[idx], weight_cap)
    sums["behaviour_weight"] += (weights * rows_mask).sum()
    return weights


def step_metrics(rewards, groups, sums: dict, tokens: torch.Tensor, updates: int, with_kl: bool) -> dict:
    """Mean reward, mean within-group std, share of groups without signal, the mean loss per
    update and the token-weighted clip_frac, ratio and (``with_kl``) kl."""
    _, group_std = group_moments(rewards, groups)
    metrics = {
        "reward": rewards.mean(),
        "reward_std": group_std.mean(),
        "zero_std_groups": (group_std < 1e-6).float().mean(),
        "loss": sums["loss"] / max(updates, 1),
    }
    if tokens.item() > 0:  # one wait per step (the progress bar waits for its values anyway)
        metrics.update({name: sums[name] / tokens for name in ("clip_frac", "ratio")})
        if with_kl:
            metrics["kl"] = sums["kl"] / tokens
    return metrics
