"""Group relative policy optimisation (GRPO).

Each training step takes a batch of prompts and
  1. rolls out a group of ``group_size`` completions per prompt with the InferenceEngine, which
     runs a copy of the policy (rollout.py);
  2. scores every completion with the configured rewards (rewards.py);
  3. turns rewards into advantages relative to the group: A = (r - mean_group) / std_group
     (or just r - mean_group with ``scale_rewards: false``);
  4. runs ``ppo_epochs`` passes over the rollouts, in mini-batches of ``mini_batch_size``
     sequences, each an optimizer step on the clipped objective
         -min(rho A, clip(rho, 1 - eps, 1 + eps_high) A) + kl_coef * KL(policy || reference),
     rho = pi(token) / pi_old(token) per completion token, KL by the k3 estimator
     exp(ref - logp) - (ref - logp) - 1, averaged over tokens (``aggregation: token``) or over
     each sequence's tokens and then sequences (``aggregation: sequence``);
  5. copies the new weights into the engine every ``sync_interval`` optimizer steps, with the
     step number as the weights' version.

Offline batches (prompts with responses and rewards already given, data/grpo.py) skip 1-2.
An episode is code (``workflow``, workflow.py: single turn by default, or multi-turn with a
calculator tool); with ``asynchronous`` the rollouts of later batches are generated in the
background while the trainer trains, within ``max_staleness`` weight versions (grpo_async.py).
Optimisation is manual (several optimizer steps per batch), so gradient clipping is this
module's ``max_grad_norm``, not the Trainer's ``gradient_clip_val``; ``trainer.max_steps``
counts optimizer steps.

This file holds the options and the update; the rollout side (steps 1-2) is grpo_episodes.py,
the log-probs grpo_logps.py, the loss grpo_loss.py and the logged statistics grpo_stats.py.
"""

from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path
from typing import Literal

import torch

from astrai.core.engine import EngineConfig, SamplingParams
from astrai.core.errors import require_for

from .base_module import BatchError, CausalLMModule
from .grpo_async import behaviour_weights, updates_per_batch
from .grpo_episodes import GRPOEpisodes
from .grpo_logps import BatchLayout, RowCut, frozen_logps, token_logps
from .grpo_loss import (  # noqa: F401 - importable from here
    AGGREGATIONS,
    GRPOLoss,
    group_advantages,
    group_moments,
    grpo_loss,
)
from .grpo_stats import in_step_stats, step_metrics
from .lora import adapters_disabled
from .losses import IGNORE_INDEX
from .model_source import build_model
from .remote_rollout import RolloutConfig, check_strategy
from .rewards import RewardSpec, load_rewards
from .rollout import engine_config_for, log_reward_metrics, resolve_dtype, sample_seed
from .schedulers import NEED_LENGTH
from .workflow import RolloutWorkflow, load_workflow

OLD_LOGPS = ("policy", "engine")
OFFLINE_KEYS = ("input_ids", "labels", "attention_mask", "rewards", "group_ids")
REF_PREFIX = "ref_model."
_check = require_for("model")  # constructor checks name the config field: model.group_size, ...


# ---- the Lightning module ------------------------------------------------------------------------


class GRPOModule(GRPOEpisodes, CausalLMModule):
    """GRPO fine-tuning of a policy that starts from `model` (usually an SFT or DPO export).

    Args:
        rewards: the reward functions, ``[{fn: <import path>, weight: 1.0, kwargs: {...}}, ...]``
            (see astrai.train.rewards); the total reward is their weighted sum. Needed for
            online training and for validation.
        group_size: completions per prompt (G >= 2).
        max_new_tokens: most tokens per completion.
        temperature, top_k, top_p: sampling of the rollouts.
        epsilon, epsilon_high: the ratio is clipped to [1 - epsilon, 1 + epsilon_high]
            (epsilon_high defaults to epsilon).
        kl_coef: weight of the KL penalty towards the frozen reference; 0 builds no reference.
        reference_model: directory of the reference (default: a frozen copy of the initial
            policy, or with LoRA the policy with adapters disabled).
        scale_rewards: divide advantages by the group's reward std (off: only subtract the mean).
        aggregation: "token" (mean over all completion tokens of a mini-batch) or "sequence"
            (mean over each completion's tokens, then over completions).
        ppo_epochs: optimisation passes over each rollout batch.
        mini_batch_size: completions per optimizer step (default: the whole rollout batch).
        micro_batch_size: completions per forward/backward pass inside a mini-batch (memory).
        sync_interval: copy the policy into the engine every this many optimizer steps.
        old_logps: behaviour log-probs in the ratio: "policy" (recomputed by the policy before
            the first epoch; robust to the engine's lower precision) or "engine" (as sampled:
            saves a forward pass and weights stale samples correctly).
        rollout_dtype: the engine's dtype: auto (bfloat16 on GPUs, else float32), float32, bfloat16, float16.
        engine: the rollout engine's settings (astrai.core.engine.EngineConfig), e.g.
            {max_batch_size: 128, kv_cache_memory: 2GiB}; max_batch_size is raised to hold a
            whole group (group_size, val_samples) when it is smaller.
        rollout: generate on running `astrai-serve` servers instead of an in-process engine,
            e.g. {servers: [http://127.0.0.1:8000]} (astrai.train.remote_rollout.RolloutConfig);
            the weights go to them after every sync. rollout_dtype and engine are then unused.
        max_grad_norm: clip the gradient norm before each optimizer step (None: off).
        rollout_seed: seeds the sampling (each prompt's seed also depends on the step).
        val_temperature, val_samples: sampling of the validation completions (default: one
            greedy completion per prompt).
        workflow: how an episode runs (astrai.train.workflow): a RolloutWorkflow, or
            {class_path: ..., init_args: {...}}; default single turn.
        asynchronous: generate the rollouts of later batches in a background thread while the
            trainer trains (the YAML word ``async`` is a Python keyword, hence the name).
        max_staleness: with ``asynchronous``, the most optimizer steps (weights versions) the
            weights that sampled a group may be behind the policy that trains on it; it sets how
            many batches are generated ahead, and older groups are dropped. 0 is synchronous.
        behaviour_weight_cap: with ``asynchronous`` and old_logps=policy, samples of older
            weights weigh pi_policy_before_update / pi_sampled per token (decoupled PPO),
            truncated at this value.
        **kwargs: the shared options of CausalLMModule (model, tokenizer, optimizer, schedule, export, lora, ...).

    Logs train/reward (mean), train/reward_std (mean within-group std), train/reward/<name>,
    train/kl, train/clip_frac, train/ratio, train/loss, train/completion_len(_max),
    train/truncated (share cut at max_new_tokens), train/rollout_tokens_per_sec,
    train/weights_lag (optimizer steps between the weights that sampled and the policy),
    train/zero_std_groups (share of groups without signal), train/logp_gap (mean |policy -
    engine| log-prob, old_logps=policy); val/reward, val/reward/<name>, val/completion_len.
    """

    def __init__(
        self,
        rewards: list[RewardSpec] | None = None,
        group_size: int = 4,
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        kl_coef: float = 0.0,
        reference_model: str | None = None,
        scale_rewards: bool = True,
        aggregation: Literal["token", "sequence"] = "token",
        ppo_epochs: int = 1,
        mini_batch_size: int | None = None,
        micro_batch_size: int | None = None,
        sync_interval: int = 1,
        old_logps: Literal["policy", "engine"] = "policy",
        rollout_dtype: str | None = "auto",
        engine: EngineConfig | None = None,
        rollout: RolloutConfig | None = None,
        max_grad_norm: float | None = 1.0,
        rollout_seed: int = 0,
        val_temperature: float = 0.0,
        val_samples: int = 1,
        workflow: RolloutWorkflow | dict | None = None,
        asynchronous: bool = False,
        max_staleness: int = 1,
        behaviour_weight_cap: float = 2.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.automatic_optimization = False
        _check(
            isinstance(group_size, int) and group_size >= 2,
            "group_size",
            f"must be an integer >= 2 (advantages compare completions of one prompt), got {group_size!r}",
        )
        for name, value in (
            ("max_new_tokens", max_new_tokens),
            ("ppo_epochs", ppo_epochs),
            ("sync_interval", sync_interval),
            ("val_samples", val_samples),
        ):
            _check(isinstance(value, int) and value >= 1, name, f"must be a positive integer, got {value!r}")
        for name, value in (("mini_batch_size", mini_batch_size), ("micro_batch_size", micro_batch_size)):
            _check(
                value is None or (isinstance(value, int) and value >= 1),
                name,
                f"must be a positive integer or null, got {value!r}",
            )
        _check(0 < epsilon < 1, "epsilon", f"must be in (0, 1), got {epsilon!r}")
        _check(epsilon_high is None or epsilon_high > 0, "epsilon_high", f"must be > 0, got {epsilon_high!r}")
        _check(kl_coef >= 0, "kl_coef", f"must be >= 0, got {kl_coef!r}")
        _check(aggregation in AGGREGATIONS, "aggregation", f"must be one of {AGGREGATIONS}, got {aggregation!r}")
        _check(old_logps in OLD_LOGPS, "old_logps", f"must be one of {OLD_LOGPS}, got {old_logps!r}")
        _check(
            max_grad_norm is None or max_grad_norm > 0, "max_grad_norm", f"must be > 0 or null, got {max_grad_norm!r}"
        )
        _check(
            reference_model is None or kl_coef > 0,
            "reference_model",
            "is only used for the KL penalty; set model.kl_coef > 0 or drop it",
        )
        resolve_dtype(rollout_dtype, torch.device("cpu"))  # checks the name now rather than at the first step
        _check(isinstance(asynchronous, bool), "asynchronous", f"must be true or false, got {asynchronous!r}")
        _check(
            isinstance(max_staleness, int) and max_staleness >= 0,
            "max_staleness",
            f"must be an integer >= 0 (optimizer steps), got {max_staleness!r}",
        )
        _check(
            not asynchronous or max_staleness >= sync_interval - 1,
            "max_staleness",
            f"({max_staleness}) must be at least sync_interval - 1 ({sync_interval - 1}): weights synced "
            "every sync_interval steps are that old already; raise it or lower model.sync_interval",
        )
        _check(behaviour_weight_cap >= 1, "behaviour_weight_cap", f"must be >= 1, got {behaviour_weight_cap!r}")
        self.workflow = load_workflow(workflow)
        self.asynchronous, self.max_staleness = asynchronous, max_staleness
        self.behaviour_weight_cap = behaviour_weight_cap
        self.rewards = load_rewards(rewards)
        self.group_size, self.max_new_tokens = group_size, max_new_tokens
        self.sampling = SamplingParams(
            n=group_size, temperature=temperature, top_k=top_k, top_p=top_p, max_tokens=max_new_tokens, logprobs=0
        )
        self.val_sampling = SamplingParams(
            n=val_samples, temperature=val_temperature, top_k=top_k, top_p=top_p, max_tokens=max_new_tokens, logprobs=0
        )
        try:
            self.sampling.validate(), self.val_sampling.validate()
        except ValueError as e:
            raise ValueError(f"model: {e}") from None
        self.epsilon, self.epsilon_high, self.kl_coef = epsilon, epsilon_high, kl_coef
        self.scale_rewards, self.aggregation, self.ppo_epochs = scale_rewards, aggregation, ppo_epochs
        self.mini_batch_size, self.micro_batch_size = mini_batch_size, micro_batch_size
        self.sync_interval, self.old_logps_source = sync_interval, old_logps
        self.engine_config = engine_config_for(engine, needed=max(group_size, val_samples))
        self.rollout_dtype_name = rollout_dtype
        self.rollout_config = RolloutConfig.of(rollout)  # None: the in-process engine
        self.max_grad_norm, self.rollout_seed = max_grad_norm, rollout_seed
        self.ref_model = None
        source = reference_model if reference_model is not None else self.hparams.model
        self._reference_on_disk = isinstance(source, str) and Path(source).is_dir()
        if kl_coef > 0 and reference_model is not None:
            self.ref_model = build_model(reference_model, self.tokenizer)
        elif kl_coef > 0 and self.lora_config is None:
            self.ref_model = copy.deepcopy(self.model)
        if self.ref_model is not None:
            self.ref_model.requires_grad_(False)
            self.ref_model.enable_gradient_checkpointing(False)
        self._init_rollout_state()

    # -- log-probabilities ---------------------------------------------------------------------------
    def _token_logps(self, model, data: dict, cut: RowCut) -> torch.Tensor:
        """Per-token log-probs (rows, T) of the labels of the rows ``cut`` holds (grpo_logps.token_logps)."""
        return token_logps(model, data, cut, dynamic=self.hparams.compile)

    def _frozen_logps(self, model, data: dict, layout: BatchLayout | None = None) -> torch.Tensor:
        """Every row's log-probs without gradients, micro_batch_size rows at a time, in eval mode."""
        layout = layout or BatchLayout(data)
        return frozen_logps(self._token_logps, model, layout, data, self.micro_batch_size)

    def reference_logps(self, data: dict, layout: BatchLayout | None = None) -> torch.Tensor:
        if self.ref_model is not None:
            return self._frozen_logps(self.ref_model, data, layout)
        with adapters_disabled(self.model):
            return self._frozen_logps(self.model, data, layout)

    # -- training --------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        if isinstance(batch, dict) and "prompt_ids" in batch:
            episodes = (
                self._async_episodes(batch)
                if self.asynchronous
                else self._generate(batch, self.sampling, "train", self.global_step)
            )
            if episodes is None:
                return  # the asynchronous pipeline is still filling, or every group was too stale
            data, stats = self._online_batch(*episodes)
        else:
            self.check_once(batch, OFFLINE_KEYS, "train")
            data, stats = {k: batch[k] for k in OFFLINE_KEYS}, {}
        self._optimise(data, stats)

    def _optimise(self, data: dict, stats: dict) -> None:
        mask = data["labels"] != IGNORE_INDEX
        layout = BatchLayout(data)  # micro-batches are cut on the host: see grpo_logps
        rewards, groups = data["rewards"].float(), data["group_ids"]
        advantages = group_advantages(rewards, groups, self.scale_rewards)
        n = rewards.shape[0]
        engine_logps = data.get("engine_logps")
        if self.old_logps_source == "engine" and engine_logps is not None:
            old = engine_logps
        elif self._old_logps_in_step(n):
            old = None  # each micro-batch's own forward gives them, see _old_logps_in_step
        else:
            old = self._frozen_logps(self.model, data, layout)
        stale = None
        if self.asynchronous and old is not engine_logps and "versions" in data:
            stale = data["versions"] < self.global_step
            stale = stale if stale.any() else None  # rows of older weights get decoupled-PPO weights
        weights = None
        if old is not None and old is not engine_logps and engine_logps is not None:
            stats["logp_gap"] = ((old - engine_logps).abs() * mask).sum() / mask.sum().clamp(min=1)
            if stale is not None:
                weights = behaviour_weights(old, engine_logps, stale, self.behaviour_weight_cap)
                stats["behaviour_weight"] = (weights * mask).sum() / mask.sum().clamp(min=1)
        ref = self.reference_logps(data, layout) if self.kl_coef > 0 else None

        opt, sched = self.optimizers(), self.lr_schedulers()
        mini = min(self.mini_batch_size or n, n)
        micro = min(self.micro_batch_size or mini, mini)
        shuffle = torch.Generator().manual_seed(sample_seed(self.rollout_seed, self.global_step, 1))
        # Device tensors: reading a value back per micro-batch would wait for the device each time.
        names = ("loss", "kl", "clip_frac", "ratio", "logp_gap", "behaviour_weight")
        sums = {name: torch.zeros((), device=self.device) for name in names}
        tokens, updates = torch.zeros((), device=self.device), 0
        max_steps = self.trainer.max_steps
        for _ in range(self.ppo_epochs):
            order = torch.randperm(n, generator=shuffle) if mini < n else torch.arange(n)  # on the host
            for start in range(0, n, mini):
                if 0 < max_steps <= self.global_step:
                    break
                rows = order[start : start + mini]
                normalizer = layout.labelled_tokens(rows) if self.aggregation == "token" else len(rows)
                for m in range(0, len(rows), micro):
                    cut = layout.cut(rows[m : m + micro])
                    idx = cut.index
                    logps = self._token_logps(self.model, data, cut)
                    if old is None:  # the policy before this (the batch's only) update: this forward
                        old_rows = logps.detach()
                        weight_rows = in_step_stats(
                            old_rows, engine_logps, stale, mask, idx, sums, self.behaviour_weight_cap
                        )
                    else:
                        old_rows, weight_rows = old[idx], None if weights is None else weights[idx]
                    out = grpo_loss(
                        logps,
                        old_rows,
                        advantages[idx],
                        mask[idx],
                        None if ref is None else ref[idx],
                        self.epsilon,
                        self.epsilon_high,
                        self.kl_coef,
                        self.aggregation,
                        normalizer,
                        weight_rows,
                    )
                    loss = out.loss
                    aux = self.model.aux_loss()
                    if torch.is_tensor(aux):  # MoE load balancing, weighted by this micro-batch's share
                        loss = loss + aux * len(idx) / len(rows)
                    self.manual_backward(loss)
                    if self._float32_grads is not None:  # bf16 weights: sum micro-batches in float32
                        self._float32_grads.collect()
                    k = out.n_tokens.detach()
                    sums["loss"] += out.loss.detach()
                    for name in ("kl", "clip_frac", "ratio"):
                        sums[name] += getattr(out, name).detach() * k
                    tokens += k
                if self._float32_grads is not None:
                    # Each manual backward was all-reduced under DDP already: no averaging here.
                    self._float32_grads.release()
                if self.max_grad_norm:
                    self.clip_grad_norm(opt, self.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                sched.step()
                updates += 1
                if self._rollout is not None and self.global_step % self.sync_interval == 0:
                    self._sync_rollout()
        if old is None and engine_logps is not None:  # summed per micro-batch by in_step_stats
            stats["logp_gap"] = sums["logp_gap"] / mask.sum().clamp(min=1)
            if stale is not None:
                stats["behaviour_weight"] = sums["behaviour_weight"] / mask.sum().clamp(min=1)
        self._log_step(rewards, groups, sums, tokens, updates, stats, data, layout)

    def _old_logps_in_step(self, completions: int) -> bool:
        """Whether the behaviour (old) log-probs of old_logps=policy can come from the training
        forward itself, saving the separate forward over the whole batch that computes them
        first: so when the batch gives one optimizer step (one epoch, one mini-batch), since
        the policy has not changed before that step, and when nothing random (LoRA dropout)
        makes the training forward differ from an evaluation one. The ratio is then exactly 1
        with the gradient of the log-probs, as TRL does with one iteration."""
        one_update = updates_per_batch(completions, self.mini_batch_size, self.ppo_epochs) == 1
        dropout = self.lora_config is not None and self.lora_config.dropout > 0
        return one_update and not dropout

    def _log_step(self, rewards, groups, sums, tokens, updates, stats, data, layout: BatchLayout) -> None:
        metrics = step_metrics(rewards, groups, sums, tokens, updates, with_kl=self.kl_coef > 0)
        metrics.update(stats)
        for name, value in metrics.items():
            self.log(
                f"train/{name}",
                torch.as_tensor(value, dtype=torch.float32),
                batch_size=1,
                prog_bar=name in ("reward", "loss"),
            )
        self.log_lr()
        self.log_throughput(int(layout.lengths.sum()) * self.ppo_epochs, data["input_ids"].shape[1])

    def accumulated_backwards(self) -> str | None:
        # Several micro-batches add into each optimizer step when micro_batch_size splits them.
        return f"model.micro_batch_size ({self.micro_batch_size})" if self.micro_batch_size else None

    def _schedule_length(self) -> int | None:
        if self.schedule_args.decay_steps or self.schedule_args.name not in NEED_LENGTH or self.trainer.max_steps > 0:
            return super()._schedule_length()
        # Epoch-based run: several optimizer steps per batch (an estimate when mini-batches split it).
        per_batch = 1
        batch_size = getattr(self.trainer.datamodule, "batch_size", None)
        if self.mini_batch_size and batch_size:
            per_batch = math.ceil(batch_size * self.group_size / self.mini_batch_size)
        return int(self.trainer.estimated_stepping_batches) * per_batch * self.ppo_epochs

    # -- evaluation ------------------------------------------------------------------------------
    def _eval_step(self, batch, batch_idx: int, stage: str) -> None:
        if not (isinstance(batch, dict) and "prompt_ids" in batch):
            raise BatchError(
                f"GRPOModule: {stage} batches must be prompts (astrai.train.data.grpo serves "
                "validation rows as prompts), got "
                + (f"keys {sorted(batch)}" if isinstance(batch, dict) else type(batch).__name__)
            )
        # A fixed seed per batch: every validation run samples alike, so runs are comparable.
        # The rollout producer (asynchronous) finishes what it was given and waits meanwhile.
        with self._producer.paused() if self._producer is not None else contextlib.nullcontext():
            rollout, total, parts = self._generate(batch, self.val_sampling, stage, -1 - batch_idx)
        log_reward_metrics(self, stage, rollout, total, parts)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, batch_idx, "test")

    def on_fit_start(self) -> None:
        super().on_fit_start()
        check_strategy(self.trainer.strategy if self.rollout_config is not None else None)  # FSDP etc.: refused

    # -- checkpoints without a frozen reference that can be read again from disk ---------------------
    def on_save_checkpoint(self, checkpoint) -> None:
        if not self._reference_on_disk:
            return  # a copy of a freshly initialised policy cannot be rebuilt: it stays in
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith(REF_PREFIX)]:
            del state[key]

    def on_load_checkpoint(self, checkpoint) -> None:
        if self.ref_model is not None:
            state = checkpoint.setdefault("state_dict", {})
            for key, value in self.ref_model.state_dict().items():
                state.setdefault(REF_PREFIX + key, value)
