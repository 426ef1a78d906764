"""Online DPO: preference pairs sampled from the policy itself, ranked by a reward, trained on with DPO.

Each training step takes a batch of prompts and
  1. samples ``num_generations`` replies per prompt with the InferenceEngine, on a copy of the
     policy synced to the current weights before every step (rollout.py), so the pairs are
     always on-policy;
  2. scores every reply with the configured rewards (rewards.py, the same YAML specs as GRPO);
  3. pairs each prompt's best reply (chosen) with its worst (rejected); a prompt whose replies
     all scored alike (best - worst <= ``min_reward_gap``) carries no preference and is
     skipped (logged as train/tied_prompts; more generations make ties rarer);
  4. takes one DPO step on the pairs, against the same reference as DPOModule.

This is DPO with the dataset replaced by the policy's own samples (Guo et al. 2024, "Direct
Language Model Alignment from Online AI Feedback"; TRL's OnlineDPOTrainer), with a reward
function as the judge. Optimisation is automatic: trainer.gradient_clip_val and
accumulate_grad_batches work as for DPO. A batch in which every prompt tied skips its
optimizer step on one device; on several, each rank then trains on one tied pair with the loss
times 0 (every rank must run a backward pass).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from astrai.core.engine import EngineConfig, SamplingParams
from astrai.core.errors import require_for

from .base_module import BatchError
from .dpo_module import SIDES, DPOModule
from .rewards import RewardSpec, load_rewards, score
from .rollout import (
    Rollout,
    RolloutEngine,
    check_online_batch,
    engine_config_for,
    log_reward_metrics,
    resolve_dtype,
    sample_seed,
)

_check = require_for("model")


def rank_pairs(rewards: torch.Tensor, group_ids: list[int], min_gap: float = 0.0) -> tuple[list[int], list[int]]:
    """Per prompt (group), the index of its best and of its worst reply (the first of equals),
    kept only where the best beats the worst by more than ``min_gap``: (chosen, rejected)."""
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(g, []).append(i)
    chosen, rejected = [], []
    for members in groups.values():
        scores = rewards[members]
        best, worst = members[int(scores.argmax())], members[int(scores.argmin())]
        if rewards[best] - rewards[worst] > min_gap:
            chosen.append(best)
            rejected.append(worst)
    return chosen, rejected


def _subset(rollout: Rollout, rows: list[int]) -> Rollout:
    return Rollout(
        prompt_ids=[rollout.prompt_ids[i] for i in rows],
        completion_ids=[rollout.completion_ids[i] for i in rows],
        logps=[rollout.logps[i] for i in rows],
        group_ids=[rollout.group_ids[i] for i in rows],
    )


@dataclass
class SampledPairs:
    """The preference pairs one batch of prompts gave, as the module trained on them."""

    rollout: Rollout  # every sampled reply
    rewards: torch.Tensor  # (replies,) total reward of each, float64
    reward_parts: dict[str, torch.Tensor]  # each reward's raw values by name
    chosen: list[int] = field(default_factory=list)  # reply index of each pair's chosen side
    rejected: list[int] = field(default_factory=list)
    batch: dict[str, torch.Tensor] | None = None  # the DPO batch (chosen_/rejected_ input_ids, labels, attention_mask)
    loss_weight: float = 1.0  # 0 for a stand-in pair (a batch of ties on several devices)

    @property
    def num_prompts(self) -> int:
        return len(set(self.rollout.group_ids))

    @property
    def tied_share(self) -> float:
        """Share of prompts that gave no pair."""
        return 1.0 - len(self.chosen) / max(self.num_prompts, 1) if self.loss_weight else 1.0

    def texts(self, side: Literal["chosen", "rejected"]) -> list[str]:
        return [self.rollout.texts[i] for i in getattr(self, side)]

    def side_rewards(self, side: Literal["chosen", "rejected"]) -> torch.Tensor:
        return self.rewards[getattr(self, side)]


class OnlineDPOModule(DPOModule):
    """Online DPO of a policy that starts from ``model`` (usually an SFT export); see the module docstring.

    Args:
        rewards: the reward functions that rank the replies, as for GRPO, e.g.
            [{fn: astrai.train.rewards.answer_match, weight: 1.0}] (rewards.py).
        num_generations: replies sampled per prompt (>= 2); the best and the worst make the pair.
        max_new_tokens: most tokens of a reply.
        temperature, top_k, top_p: sampling of the replies.
        min_reward_gap: a pair needs chosen reward - rejected reward > this (0: any difference).
        beta, loss_type, label_smoothing, rpo_alpha, reference_model: DPO's (DPOModule): the
            reference is a frozen copy of the initial policy, the policy with its LoRA adapters
            off, or the model directory given.
        rollout_dtype: the engine's dtype: auto (bfloat16 on GPUs, else float32), float32, bfloat16, float16.
        engine: the engine's settings (astrai.core.engine.EngineConfig); max_batch_size is
            raised to hold num_generations (and val_samples) replies.
        rollout_seed: seeds the sampling (each prompt's seed also depends on the step).
        val_temperature, val_samples: sampling of the validation replies (default: one greedy
            reply per prompt).
        **kwargs: the shared options of CausalLMModule (model, tokenizer, optimizer, schedule, export, lora, ...).

    Logs, besides DPOModule's train/* (loss, reward_acc, margin, chosen_reward and
    rejected_reward: the implicit DPO rewards, ...): train/reward (mean reward of all sampled
    replies), train/reward/<name>, train/reward_gap (mean chosen - rejected reward of the
    pairs), train/tied_prompts (share of prompts without a pair), train/completion_len,
    train/truncated, train/rollout_tokens_per_sec; val/reward, val/reward/<name>, val/completion_len.
    """

    def __init__(
        self,
        rewards: list[RewardSpec] | None = None,
        num_generations: int = 2,
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_reward_gap: float = 0.0,
        beta: float = 0.1,
        loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
        label_smoothing: float = 0.0,
        rpo_alpha: float = 0.0,
        reference_model: str | None = None,
        rollout_dtype: str | None = "auto",
        engine: EngineConfig | None = None,
        rollout_seed: int = 0,
        val_temperature: float = 0.0,
        val_samples: int = 1,
        **kwargs,
    ):
        _check(
            isinstance(num_generations, int) and num_generations >= 2,
            "num_generations",
            f"must be an integer >= 2 (a pair needs two replies to the prompt), got {num_generations!r}",
        )
        for name, value in (("max_new_tokens", max_new_tokens), ("val_samples", val_samples)):
            _check(isinstance(value, int) and value >= 1, name, f"must be a positive integer, got {value!r}")
        _check(min_reward_gap >= 0, "min_reward_gap", f"must be >= 0, got {min_reward_gap!r}")
        resolve_dtype(rollout_dtype, torch.device("cpu"))  # checks the name now rather than at the first step
        super().__init__(
            beta=beta,
            loss_type=loss_type,
            label_smoothing=label_smoothing,
            reference_model=reference_model,
            precomputed_reference=False,  # the replies are new every step: nothing to precompute
            rpo_alpha=rpo_alpha,
            **kwargs,
        )
        self.rewards = load_rewards(rewards)
        self.num_generations, self.min_reward_gap = num_generations, min_reward_gap
        self.sampling = SamplingParams(
            n=num_generations, temperature=temperature, top_k=top_k, top_p=top_p, max_tokens=max_new_tokens
        )
        self.val_sampling = SamplingParams(
            n=val_samples, temperature=val_temperature, top_k=top_k, top_p=top_p, max_tokens=max_new_tokens
        )
        try:
            self.sampling.validate(), self.val_sampling.validate()
        except ValueError as e:
            raise ValueError(f"model: {e}") from None
        self.engine_config = engine_config_for(engine, needed=max(num_generations, val_samples))
        self.rollout_dtype_name, self.rollout_seed = rollout_dtype, rollout_seed
        self._rollout: RolloutEngine | None = None  # built on first use, on the training device
        self._checked_prompts = False
        self.last_pairs: SampledPairs | None = None  # the pairs of the latest training step

    # -- sampling and ranking ------------------------------------------------------------------
    def rollout_engine(self) -> RolloutEngine:
        """The engine, built on first use and synced to the current weights before every use."""
        if self.tokenizer is None:
            raise BatchError(
                "OnlineDPOModule: sampling replies needs a tokenizer; set model.tokenizer "
                "(or give a model directory that holds one)"
            )
        # Validation runs under inference mode; the engine's weights and KV pages must not be
        # inference tensors, or later syncs could not update them in place.
        with torch.inference_mode(False):
            if self._rollout is None:
                dtype = resolve_dtype(self.rollout_dtype_name, self.device)
                self._rollout = RolloutEngine(
                    self.model, self.tokenizer, dtype, self.device, self.lora_config, self.engine_config
                )
                self._rollout.sync(self.model, self.global_step)
            elif self._rollout.version != self.global_step:
                self._rollout.sync(self.model, self.global_step)
        return self._rollout

    def generate(
        self, batch: dict, params: SamplingParams, stage: str, step: int
    ) -> tuple[Rollout, torch.Tensor, dict[str, torch.Tensor]]:
        """Replies to the batch's prompts from the current policy, and their rewards (total, parts)."""
        self._check_prompts(batch, stage)
        engine = self.rollout_engine()
        seeds = [sample_seed(self.rollout_seed, step, self.global_rank, i) for i in range(len(batch["prompt_ids"]))]
        prompts, rows = batch["prompts"], batch["rows"]
        try:
            rollout = engine.generate(batch["prompt_ids"], params, seeds)
            group = rollout.group_ids
            total, parts = score(self.rewards, [prompts[g] for g in group], rollout.texts, [rows[g] for g in group])
        except ValueError as e:  # prompts too long for the engine, a reward that fails on this data
            raise BatchError(f"OnlineDPOModule ({stage}): {e}") from e
        return rollout, total, parts

    def sample_pairs(self, batch: dict, step: int) -> SampledPairs:
        """Sample, score and rank replies to the batch's prompts; the pairs as a DPO batch."""
        rollout, total, parts = self.generate(batch, self.sampling, "train", step)
        pairs = SampledPairs(rollout, total, parts)
        pairs.chosen, pairs.rejected = rank_pairs(total, rollout.group_ids, self.min_reward_gap)
        if not pairs.chosen and self._trainer is not None and self.trainer.world_size > 1:
            # Every rank must run a backward pass: a stand-in pair whose loss counts nothing.
            pairs.chosen, pairs.rejected, pairs.loss_weight = [0], [1], 0.0
        if pairs.chosen:
            pad = self.tokenizer.pad_token_id or 0
            pairs.batch = {}
            for side in SIDES:
                tensors = _subset(rollout, getattr(pairs, side)).tensors(pad, self.device)
                pairs.batch.update({f"{side}_{k}": tensors[k] for k in ("input_ids", "labels", "attention_mask")})
        return pairs

    def _check_prompts(self, batch: Any, stage: str) -> None:
        vocab = None if self._checked_prompts else self.config.vocab_size  # token ids: once a run
        check_online_batch(
            "OnlineDPOModule",
            batch,
            stage,
            "prompts to answer; astrai.train.data.grpo.GRPODataModule with prompt rows serves them",
            "replies are ranked by the rewards",
            self.rewards,
            vocab,
        )
        self._checked_prompts = True

    # -- steps -----------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        super().on_fit_start()
        # A step without pairs returns None on purpose (see training_step); Lightning would warn each time.
        warnings.filterwarnings("ignore", message=r"`training_step` returned `None`", module="lightning")

    def training_step(self, batch, batch_idx):
        pairs = self.last_pairs = self.sample_pairs(batch, self.global_step)
        self._log_sampling(pairs)
        if pairs.batch is None:
            return None  # every prompt tied: nothing to prefer, so no optimizer step
        loss = super().training_step(pairs.batch, batch_idx)
        return loss if pairs.loss_weight else loss * 0.0

    def _log_sampling(self, pairs: SampledPairs) -> None:
        rollout = pairs.rollout
        lengths = torch.tensor([len(c) for c in rollout.completion_ids], dtype=torch.float32)
        metrics = {
            "reward": pairs.rewards.mean(),
            "tied_prompts": pairs.tied_share,
            "completion_len": lengths.mean(),
            "truncated": sum(r == "length" for r in rollout.finish_reasons) / max(len(lengths), 1),
            "rollout_tokens_per_sec": rollout.num_tokens / max(rollout.seconds, 1e-9),
        }
        metrics.update({f"reward/{name}": values.mean() for name, values in pairs.reward_parts.items()})
        if pairs.chosen and pairs.loss_weight:
            metrics["reward_gap"] = (pairs.side_rewards("chosen") - pairs.side_rewards("rejected")).mean()
        for name, value in metrics.items():
            self.log(f"train/{name}", torch.as_tensor(value, dtype=torch.float32), batch_size=1)

    def _eval_step(self, batch, batch_idx: int, stage: str) -> None:
        # A fixed seed per batch: every validation run samples alike, so runs are comparable.
        rollout, total, parts = self.generate(batch, self.val_sampling, stage, -1 - batch_idx)
        log_reward_metrics(self, stage, rollout, total, parts)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, batch_idx, "test")
