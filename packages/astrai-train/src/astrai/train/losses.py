"""Loss functions as pure tensor functions, shared by the Lightning modules and the tests.

Labels follow the batch contract: labels[b, t] is the token to predict after input_ids[b, :t+1]
(already shifted by the data module), and IGNORE_INDEX marks positions without a target.
"""

from __future__ import annotations

import functools
from typing import Callable, Literal, NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
DPO_LOSS_TYPES = ("sigmoid", "ipo")


class TokenLoss(NamedTuple):
    loss: torch.Tensor  # mean over labelled tokens (what is optimised)
    nll_sum: torch.Tensor  # summed plain negative log-likelihood, detached (for perplexity)
    n_tokens: torch.Tensor  # number of labelled tokens


def token_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> TokenLoss:
    """Next-token cross-entropy averaged over labelled tokens, with optional label smoothing.

    A batch with no labelled token gives a zero loss (and zero gradient) instead of NaN, so one
    empty micro-batch cannot poison a run.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_labels = labels.reshape(-1)
    n_tokens = (flat_labels != IGNORE_INDEX).sum()
    total = F.cross_entropy(
        flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=label_smoothing
    )
    if label_smoothing > 0:
        with torch.no_grad():  # perplexity must stay the plain likelihood
            nll_sum = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    else:
        nll_sum = total.detach()
    return TokenLoss(total / n_tokens.clamp(min=1), nll_sum, n_tokens)


@functools.cache
def compiled_token_loss() -> Callable[..., TokenLoss]:
    """token_loss under torch.compile (built once, on first use).

    Eager, the loss upcasts the (tokens, vocab) logits to a float32 copy, and log_softmax
    saves a float32 output for backward: at 16k tokens x 32k vocab that is 2 GB each, plus
    their float32 gradients, all passing through memory several times. Compiled, inductor
    reads the bf16 logits once, keeps only a per-row logsumexp for backward and writes the
    bf16 gradient in one kernel. The arithmetic (float32 softmax) is the same.
    """
    return torch.compile(token_loss)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log p(label) over the labelled positions of each row: shape (batch,)."""
    nll = F.cross_entropy(
        logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )  # (batch, seq), zero where ignored
    return -nll.sum(-1)


class DPOLoss(NamedTuple):
    losses: torch.Tensor  # (batch,)
    chosen_rewards: torch.Tensor  # beta * (policy - reference) log-ratio of the chosen reply, detached
    rejected_rewards: torch.Tensor


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
    label_smoothing: float = 0.0,
) -> DPOLoss:
    """Direct preference optimisation on per-sequence log-probabilities (each (batch,)).

    h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))
    - sigmoid (DPO): -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h); eps > 0 is
      conservative DPO, which assumes a fraction eps of the preference labels are flipped.
    - ipo: (h - 1 / (2 beta))^2, which regresses the margin to a finite target instead of
      pushing it to infinity, so it does not overfit deterministic preferences.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    return DPOLoss(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())
