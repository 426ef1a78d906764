"""Direct preference optimisation against a frozen reference model.

The reference is, in order of preference:
  1. log-probabilities precomputed in the batch (ref_chosen_logps, ref_rejected_logps);
  2. with LoRA, the policy itself with its adapters switched off (no second copy in memory);
  3. otherwise a frozen model: `reference_model` if given, else a copy of the initial policy.
A reference read from a model directory is left out of checkpoints (it never changes) and
read again on load; one copied from a freshly initialised policy cannot be rebuilt, so it stays in.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from .base_module import BatchError, CausalLMModule
from .lora import adapters_disabled
from .losses import DPO_LOSS_TYPES, IGNORE_INDEX, dpo_loss, sequence_logps
from .model_source import build_model

SIDES = ("chosen", "rejected")
DPO_KEYS = tuple(f"{side}_{key}" for side in SIDES for key in ("input_ids", "labels", "attention_mask"))
REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")
REF_PREFIX = "ref_model."


def _pad_to(t: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return F.pad(t, (0, length - t.shape[1]), value=value)


class DPOModule(CausalLMModule):
    """Preference tuning (DPO / IPO) of a policy that starts from `model` (usually an SFT export).

    Args:
        beta: strength of the implicit KL penalty towards the reference (smaller = drift further).
        loss_type: "sigmoid" (DPO) or "ipo".
        label_smoothing: assumed share of flipped preference labels (conservative DPO, sigmoid only).
        reference_model: directory of the reference model; default: a frozen copy of the
            initial policy (or, with LoRA, the policy with adapters disabled).
        precomputed_reference: take reference log-probs from the batch only; no reference
            model is kept in memory and a batch without them is an error.
        rpo_alpha: weight of the chosen replies' negative log-likelihood (mean per token) added
            to the loss (RPO, Pang et al. 2024; TRL's ``rpo_alpha``). DPO only widens the gap
            between chosen and rejected; on near-miss pairs, which share all but a few tokens,
            it can do so by making both less likely, and greedy answers get worse. The NLL term
            keeps the chosen replies likely. 0 (default) is plain DPO.
        **kwargs: the shared options of CausalLMModule (model, tokenizer, optimizer, schedule, export, lora, ...).

    Logs {train,val}/loss, reward_acc (share of pairs whose chosen reward is higher),
    margin (mean chosen - rejected reward), chosen_reward, rejected_reward, chosen_logps,
    rejected_logps, chosen_likelier (share of pairs whose chosen reply the policy itself finds
    likelier than the rejected one: unlike reward_acc, not 0 by construction before training),
    and with rpo_alpha the chosen replies' nll. In
    training the progress bar shows "loss" and "reward_acc" (see CausalLMModule.show).
    """

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
        label_smoothing: float = 0.0,
        reference_model: str | None = None,
        precomputed_reference: bool = False,
        rpo_alpha: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        if not rpo_alpha >= 0:
            raise ValueError(f"rpo_alpha must be >= 0 (0 = plain DPO), got {rpo_alpha}")
        self.rpo_alpha = rpo_alpha
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.precomputed_reference = precomputed_reference
        self.ref_model = None
        source = reference_model if reference_model is not None else self.hparams.model
        self._reference_on_disk = isinstance(source, str) and Path(source).is_dir()
        if reference_model is not None:
            self.ref_model = build_model(reference_model, self.tokenizer)
        elif not precomputed_reference and self.lora_config is None:
            self.ref_model = copy.deepcopy(self.model)
        if self.ref_model is not None:
            self.ref_model.requires_grad_(False)
            self.ref_model.enable_gradient_checkpointing(False)

    # -- log-probabilities -------------------------------------------------------------
    def _concat(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Chosen and rejected rows stacked into one batch (right-padded to one length), so the
        policy runs one forward pass per step."""
        length = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
        ids = torch.cat([_pad_to(batch[f"{s}_input_ids"], length, 0) for s in SIDES])
        labels = torch.cat([_pad_to(batch[f"{s}_labels"], length, IGNORE_INDEX) for s in SIDES])
        mask = torch.cat([_pad_to(batch[f"{s}_attention_mask"], length, 0) for s in SIDES])
        return ids, labels, mask

    def _logps(self, model, ids, labels, mask) -> tuple[torch.Tensor, torch.Tensor]:
        logps = sequence_logps(model(ids, attention_mask=mask), labels, compiled=self.hparams.compile)
        return logps.chunk(2)

    @torch.no_grad()
    def reference_logps(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        if all(k in batch for k in REF_KEYS):
            return batch["ref_chosen_logps"].float(), batch["ref_rejected_logps"].float()
        if self.precomputed_reference:
            raise BatchError(
                f"DPOModule(precomputed_reference=True): batch is missing {list(REF_KEYS)} (it has {sorted(batch)})"
            )
        ids, labels, mask = self._concat(batch)
        if self.ref_model is not None:
            return self._logps(self.ref_model, ids, labels, mask)
        with adapters_disabled(self.model):
            return self._logps(self.model, ids, labels, mask)

    # -- steps ---------------------------------------------------------------------------
    def _step(self, batch, stage: str) -> torch.Tensor:
        self.check_once(batch, DPO_KEYS, stage)
        ref_chosen, ref_rejected = self.reference_logps(batch)
        policy_chosen, policy_rejected = self._logps(self.model, *self._concat(batch))
        out = dpo_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, self.beta, self.loss_type, self.label_smoothing
        )
        loss = out.losses.mean()
        n = policy_chosen.shape[0]
        on_step = stage == "train"
        margin = out.chosen_rewards - out.rejected_rewards
        metrics = {
            "loss": loss.detach(),
            "reward_acc": (margin > 0).float().mean(),
            "margin": margin.mean(),
            "chosen_reward": out.chosen_rewards.mean(),
            "rejected_reward": out.rejected_rewards.mean(),
            "chosen_logps": policy_chosen.detach().mean(),
            "rejected_logps": policy_rejected.detach().mean(),
            "chosen_likelier": (policy_chosen > policy_rejected).float().mean(),
        }
        if self.rpo_alpha:
            chosen_tokens = (batch["chosen_labels"] != IGNORE_INDEX).sum().clamp(min=1)
            nll = -policy_chosen.sum() / chosen_tokens
            loss = loss + self.rpo_alpha * nll
            metrics.update(loss=loss.detach(), nll=nll.detach())
        if on_step:  # per step, nothing waits for the device (see CausalLMModule.show)
            self.log_train_loss(metrics.pop("loss"))
            self.show("reward_acc", metrics["reward_acc"])
        for name, value in metrics.items():
            self.log(
                f"{stage}/{name}",
                value,
                batch_size=n,
                on_step=on_step,
                on_epoch=not on_step,
                prog_bar=not on_step and name in ("loss", "reward_acc"),
                sync_dist=not on_step,
            )
        return loss

    def training_step(self, batch, batch_idx):
        loss = self.add_aux_loss(self._step(batch, "train"))
        self.log_lr()
        chosen, rejected = batch["chosen_input_ids"], batch["rejected_input_ids"]
        self.log_throughput(chosen.numel() + rejected.numel(), max(chosen.shape[1], rejected.shape[1]))
        return loss

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    # -- checkpoints without the frozen reference -----------------------------------------
    def on_save_checkpoint(self, checkpoint) -> None:
        if not self._reference_on_disk:
            return
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith(REF_PREFIX)]:
            del state[key]

    def on_load_checkpoint(self, checkpoint) -> None:
        if self.ref_model is not None:
            state = checkpoint.setdefault("state_dict", {})
            for key, value in self.ref_model.state_dict().items():
                state.setdefault(REF_PREFIX + key, value)
