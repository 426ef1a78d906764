"""Loss functions as pure tensor functions, shared by the Lightning modules and the tests.

Labels follow the batch contract: labels[b, t] is the token to predict after input_ids[b, :t+1]
(already shifted by the data module), and IGNORE_INDEX marks positions without a target.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from .token_nll import IGNORE_INDEX, token_nll

DPO_LOSS_TYPES = ("sigmoid", "ipo")


class TokenLoss(NamedTuple):
    loss: torch.Tensor  # mean over labelled tokens (what is optimised)
    nll_sum: torch.Tensor  # summed plain negative log-likelihood, detached (for perplexity)
    n_tokens: torch.Tensor  # number of labelled tokens


def token_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> TokenLoss:
    """Next-token cross-entropy averaged over labelled tokens, with optional label smoothing.

    A batch with no labelled token gives a zero loss (and zero gradient) instead of NaN, so one
    empty micro-batch cannot poison a run. Eager, the float32 softmax runs in row chunks
    (token_nll.py): no float32 copy of the (tokens, vocab) logits is ever whole.
    """
    flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    total = token_nll(flat_logits, flat_labels, label_smoothing).sum()
    if label_smoothing > 0:
        with torch.no_grad():  # perplexity must stay the plain likelihood
            nll_sum = token_nll(flat_logits, flat_labels).sum()
    else:
        nll_sum = total.detach()
    return _mean(total, nll_sum, flat_labels)


def _mean(total: torch.Tensor, nll_sum: torch.Tensor, flat_labels: torch.Tensor) -> TokenLoss:
    n_tokens = (flat_labels != IGNORE_INDEX).sum()
    return TokenLoss(total / n_tokens.clamp(min=1), nll_sum, n_tokens)


def _dense_token_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> TokenLoss:
    """token_loss as one F.cross_entropy over float32 logits: the form torch.compile fuses."""
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_labels = labels.reshape(-1)
    total = F.cross_entropy(
        flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=label_smoothing
    )
    if label_smoothing > 0:
        with torch.no_grad():
            nll_sum = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    else:
        nll_sum = total.detach()
    return _mean(total, nll_sum, flat_labels)


@functools.cache
def compiled_token_loss() -> Callable[..., TokenLoss]:
    """token_loss under torch.compile (built once, on first use).

    Compiled, inductor reads the bf16 logits once, keeps only a per-row logsumexp for backward
    and writes the bf16 gradient in one kernel, from the dense formula; the arithmetic (float32
    softmax) is the same as the eager chunked path.
    """
    return torch.compile(_dense_token_loss)


def _dense_label_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """label_logps as one F.cross_entropy over float32 logits: the form torch.compile fuses."""
    return -F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")


@functools.cache
def _compiled_label_logps() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """_dense_label_logps under torch.compile (built once, on first use): inductor reads the
    logits once and fuses the float32 log-softmax, its gather and its backward, so no float32
    copy of the logits is kept, as compiled_token_loss does for the loss."""
    return torch.compile(_dense_label_logps)


def label_logps(logits: torch.Tensor, labels: torch.Tensor, compiled: bool = False) -> torch.Tensor:
    """log p(label) per row of (rows, vocab) logits, in float32; 0 where the label is IGNORE_INDEX.

    Eager, through token_nll's row chunks. ``compiled`` (the model is compiled): through the
    compiled dense formula, with the rows marked dynamic, since their number changes with every
    batch's length: compiled once for any, not first for one and again for the next.
    """
    if not compiled:
        return -token_nll(logits, labels)
    torch._dynamo.maybe_mark_dynamic(logits, 0)
    torch._dynamo.maybe_mark_dynamic(labels, 0)
    return _compiled_label_logps()(logits, labels)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, compiled: bool = False) -> torch.Tensor:
    """Sum of log p(label) over the labelled positions of each row: shape (batch,).
    ``compiled``: as label_logps's."""
    lp = label_logps(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), compiled)  # zero where ignored
    return lp.view(labels.shape).sum(-1)


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
