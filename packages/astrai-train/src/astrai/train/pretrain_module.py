"""Pre-training: next-token prediction on every labelled token."""

from __future__ import annotations

import torch

from .base_module import CausalLMModule
from .metrics import Perplexity

PRETRAIN_KEYS = ("input_ids", "labels")


class PretrainModule(CausalLMModule):
    """Causal language modelling (pre-training).

    Args:
        label_smoothing: spread this share of the target probability over the whole vocabulary
            (training loss only; validation loss and perplexity stay the plain likelihood).
        **kwargs: the shared options of CausalLMModule (model, tokenizer, optimizer, schedule, export, ...).

    Logs train/loss, train/ppl, train/tokens_per_sec, train/mfu (on GPUs), train/lr, and
    val/loss, val/ppl (token-weighted over the whole validation set); test/ likewise. The
    progress bar shows "loss" (see CausalLMModule.log_train_loss). No training-step value is
    read back to the host, so the host never waits for the device within a step.
    """

    def __init__(self, label_smoothing: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing
        self.val_ppl, self.test_ppl = Perplexity(), Perplexity()

    def compute_loss(self, batch: dict[str, torch.Tensor], stage: str):
        self.check_once(batch, PRETRAIN_KEYS, stage)
        logits = self(batch["input_ids"], batch.get("position_ids"), batch.get("attention_mask"))
        smoothing = self.label_smoothing if stage == "train" else 0.0
        return logits, self.token_loss(logits, batch["labels"], smoothing)

    def training_step(self, batch, batch_idx):
        _, out = self.compute_loss(batch, "train")
        loss = self.add_aux_loss(out.loss)
        n = out.n_tokens.clamp(min=1)
        self.log_train_loss(out.loss)
        self.log("train/ppl", torch.exp(out.nll_sum / n), batch_size=1)
        self.log_lr()
        self.log_throughput(batch["input_ids"].numel(), batch["input_ids"].shape[1])
        return loss

    def _eval_step(self, batch, stage: str, ppl: Perplexity):
        logits, out = self.compute_loss(batch, stage)
        if out.n_tokens > 0:
            ppl.update(out.nll_sum / out.n_tokens, weight=out.n_tokens)
        # Perplexity is a MeanMetric of the NLL: its log is the token-weighted validation loss.
        self.log(f"{stage}/ppl", ppl, prog_bar=stage == "val")
        return logits, out

    def on_validation_epoch_end(self):
        self._log_loss_from_ppl("val", self.val_ppl)

    def on_test_epoch_end(self):
        self._log_loss_from_ppl("test", self.test_ppl)

    def _log_loss_from_ppl(self, stage: str, ppl: Perplexity) -> None:
        if ppl.update_count:
            self.log(f"{stage}/loss", torch.log(ppl.compute()), prog_bar=stage == "val")

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val", self.val_ppl)

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test", self.test_ppl)
