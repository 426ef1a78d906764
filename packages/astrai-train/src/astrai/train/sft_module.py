"""Supervised fine-tuning: the loss covers the assistant tokens only.

The data module marks everything else (system and user turns, role headers, padding) with
label -100, and packs several conversations into one row with position_ids restarting at 0;
the model then keeps attention inside each conversation, so packed samples never see each
other. This module adds what is specific to SFT on top of the language-model loss: the
accuracy of the supervised tokens, and a loud failure when a batch supervises nothing.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchmetrics.aggregation import MeanMetric

from astrai.core.errors import require

from .base_module import BatchError
from .losses import IGNORE_INDEX
from .pretrain_module import PretrainModule


def token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(share of labelled tokens whose argmax prediction is right, number of labelled tokens)."""
    mask = labels != IGNORE_INDEX
    n = mask.sum()
    correct = ((logits.argmax(-1) == labels) & mask).sum()
    return correct.float() / n.clamp(min=1), n


class NEFTune:
    """NEFTune (Jain et al. 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning"):
    a forward hook on the input embedding that adds uniform noise in
    [-alpha / sqrt(L * d), alpha / sqrt(L * d)] to every embedding, where L is the row length
    (with packing, the packed row's) and d the hidden size; the scale follows the paper and
    Hugging Face's implementation.

    Only in training forwards: a module in eval mode (validation, test) or a forward without
    gradients (generation, a frozen reference) gets the embeddings unchanged. The exported model
    carries no hook.
    """

    def __init__(self, embedding: nn.Module, alpha: float):
        self.alpha = alpha
        self.handle = embedding.register_forward_hook(self)

    def __call__(self, module: nn.Module, args, out: torch.Tensor) -> torch.Tensor | None:
        if not (module.training and torch.is_grad_enabled()):
            return None
        bound = self.alpha / math.sqrt(out.shape[-2] * out.shape[-1])
        return out + torch.empty_like(out).uniform_(-bound, bound)


class SFTModule(PretrainModule):
    """Supervised fine-tuning on chat data (see module docstring).

    Args:
        neftune_alpha: NEFTune noise on the input embeddings while training (see NEFTune;
            0 = off; the paper uses 5 to 15). Validation, test and generation see no noise.
        **kwargs: as PretrainModule (label_smoothing and the shared CausalLMModule options).

    Typical settings differ from pre-training: start from a pre-trained `model` directory, a
    lower lr (e.g. 1e-4 full fine-tuning, 1e-3 with LoRA) and a short warmup.

    Logs, besides PretrainModule's metrics, train/acc and val/acc: next-token accuracy on the
    assistant tokens.
    """

    def __init__(self, neftune_alpha: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        require(
            isinstance(neftune_alpha, (int, float)) and neftune_alpha >= 0,
            "model.neftune_alpha",
            f"must be a number >= 0 (0 turns NEFTune off; the paper uses 5 to 15), got {neftune_alpha!r}",
        )
        self.neftune = NEFTune(self.model.model.embed_tokens, float(neftune_alpha)) if neftune_alpha > 0 else None
        self.val_acc, self.test_acc = MeanMetric(), MeanMetric()
        self._first_train_batch = True

    def training_step(self, batch, batch_idx):
        logits, out = self.compute_loss(batch, "train")
        if self._first_train_batch:
            self._first_train_batch = False
            if int(out.n_tokens) == 0:
                raise BatchError(
                    "SFTModule: the first training batch has no assistant tokens (every label is "
                    "-100); check the data's roles / chat template, or the sequence length that "
                    "may cut replies off"
                )
        loss = self.add_aux_loss(out.loss)
        n = out.n_tokens.clamp(min=1)
        acc, _ = token_accuracy(logits.detach(), batch["labels"])
        self.log_train_loss(out.loss)
        self.log("train/ppl", torch.exp(out.nll_sum / n), batch_size=1)
        self.log("train/acc", acc, batch_size=1)
        self.log_lr()
        self.log_throughput(batch["input_ids"].numel(), batch["input_ids"].shape[1])
        return loss

    def validation_step(self, batch, batch_idx):
        logits, _ = self._eval_step(batch, "val", self.val_ppl)
        self._log_acc("val", self.val_acc, logits, batch["labels"])

    def test_step(self, batch, batch_idx):
        logits, _ = self._eval_step(batch, "test", self.test_ppl)
        self._log_acc("test", self.test_acc, logits, batch["labels"])

    def _log_acc(self, stage: str, metric: MeanMetric, logits, labels) -> None:
        acc, n = token_accuracy(logits, labels)
        if n > 0:
            metric.update(acc, weight=n)
        self.log(f"{stage}/acc", metric)
