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
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from astrai.core.engine import EngineConfig, SamplingParams
from astrai.core.errors import require_for

from .base_module import BatchError, CausalLMModule, build_model
from .grpo_async import (
    RolloutProducer,
    behaviour_weights,
    fresh_groups,
    lookahead_batches,
    select_groups,
    updates_per_batch,
)
from .grpo_loss import (  # noqa: F401 - importable from here
    AGGREGATIONS,
    GRPOLoss,
    group_advantages,
    group_moments,
    grpo_loss,
)
from .lora import adapters_disabled
from .losses import IGNORE_INDEX
from .remote_rollout import RemoteRollout, RolloutConfig, check_strategy
from .rewards import RewardSpec, load_rewards, score
from .rollout import RolloutEngine, engine_config_for, log_reward_metrics, resolve_dtype, sample_seed
from .schedulers import NEED_LENGTH
from .token_nll import token_nll
from .workflow import RolloutWorkflow, apply_loss_masks, load_workflow

OLD_LOGPS = ("policy", "engine")
ONLINE_KEYS = ("prompt_ids", "prompts", "rows")
OFFLINE_KEYS = ("input_ids", "labels", "attention_mask", "rewards", "group_ids")
REF_PREFIX = "ref_model."
MAX_ALL_STALE_BATCHES = 4  # a run whose rollouts are all too stale this many times in a row stops
_check = require_for("model")  # constructor checks name the config field: model.group_size, ...


# ---- the Lightning module ------------------------------------------------------------------------


class GRPOModule(CausalLMModule):
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
        self._producer: RolloutProducer | None = None
        self._stale_dropped = 0  # completions dropped for staleness so far
        self._all_stale = 0  # rollout batches in a row without a fresh enough group
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
        self._rollout: RolloutEngine | RemoteRollout | None = None  # built on first use
        self._checked_online = False

    # -- the engine ------------------------------------------------------------------------------
    def rollout_engine(self, fresh: bool = False) -> RolloutEngine | RemoteRollout:
        """The engine, built on first use; ``fresh``: first sync it to the current weights."""
        if self.tokenizer is None:
            raise BatchError(
                "GRPOModule: generating completions needs a tokenizer; set model.tokenizer "
                "(or give a model directory that holds one)"
            )
        # Validation runs under inference mode; the engine's weights and KV pages must not be
        # inference tensors, or training could not update them in place later.
        with torch.inference_mode(False):
            if self._rollout is None and self.rollout_config is not None:
                strategy = getattr(self._trainer, "strategy", None)  # under DDP rank 0 alone pushes
                self._rollout = RemoteRollout(self.rollout_config, self.lora_config, strategy)
                self._rollout.sync(self.model, self.global_step)
            elif self._rollout is None:
                dtype = resolve_dtype(self.rollout_dtype_name, self.device)
                self._rollout = RolloutEngine(
                    self.model, self.tokenizer, dtype, self.device, self.lora_config, self.engine_config
                )
                self._rollout.sync(self.model, self.global_step)
            elif fresh and self._rollout.version != self.global_step:
                self._rollout.sync(self.model, self.global_step)
        return self._rollout

    def _generate(self, batch: dict, params: SamplingParams, stage: str, step: int):
        self._check_online(batch, stage)
        engine = self.rollout_engine(fresh=stage != "train")
        return self._episodes(engine, batch, params, stage, self._seeds(batch, step))

    def _seeds(self, batch: dict, step: int) -> list[int]:
        return [sample_seed(self.rollout_seed, step, self.global_rank, i) for i in range(len(batch["prompt_ids"]))]

    def _episodes(self, engine, batch: dict, params: SamplingParams, stage: str, seeds: list[int]):
        """Run the workflow's episodes and score them (in the trainer's thread or the producer's)."""
        prompts, rows = batch["prompts"], batch["rows"]
        try:
            rollout = self.workflow.run(engine, batch["prompt_ids"], params, seeds, self.tokenizer, rows)
            group = rollout.group_ids
            total, parts = score(self.rewards, [prompts[g] for g in group], rollout.texts, [rows[g] for g in group])
        except ValueError as e:  # prompts too long for the engine, a reward that fails on this data
            raise BatchError(f"GRPOModule ({stage}): {e}") from e
        return rollout, total, parts

    def _check_online(self, batch, stage: str) -> None:
        if not isinstance(batch, dict) or any(k not in batch for k in ONLINE_KEYS):
            have = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise BatchError(
                f"GRPOModule: a {stage} batch needs {list(ONLINE_KEYS)} (prompts to complete; see "
                f"astrai.train.data.grpo), got {have}"
            )
        if not self.rewards:
            raise BatchError(
                f"GRPOModule: {stage} generates completions and scores them, but model.rewards is "
                "empty; name at least one, e.g. [{fn: astrai.train.rewards.answer_match}]"
            )
        if not self._checked_online:
            self._checked_online = True
            vocab = self.config.vocab_size
            bad = [t for ids in batch["prompt_ids"] for t in ids if not 0 <= t < vocab]
            if bad:
                raise BatchError(
                    f"GRPOModule: batch['prompt_ids'] holds token id {bad[0]}, outside the model's "
                    f"vocabulary 0..{vocab - 1}; was the data tokenised with another tokenizer?"
                )

    # -- log-probabilities ---------------------------------------------------------------------------
    def _token_logps(self, model, data: dict, idx: torch.Tensor) -> torch.Tensor:
        """Per-token log-probs (len(idx), T) of the labels of rows ``idx``; 0 where unlabelled.
        Only labelled positions go through the output head."""
        labels = data["labels"][idx]
        length = int(data["attention_mask"][idx].sum(1).max())
        # Rows are right-padded: causal attention already keeps real tokens from seeing the
        # padding after them, so no mask is needed (and the fast causal path is used).
        ids, cut = data["input_ids"][idx, :length], labels[:, :length]
        flat = (cut != IGNORE_INDEX).reshape(-1).nonzero().squeeze(1)
        if self.hparams.compile:  # lengths change every micro-batch: compile once for any, not first for one
            torch._dynamo.maybe_mark_dynamic(ids, 1)
            torch._dynamo.maybe_mark_dynamic(flat, 0)
        logits = model(ids, logits_index=flat)
        lp = -token_nll(logits, cut.reshape(-1)[flat])  # float32 softmax in row chunks
        out = lp.new_zeros(cut.numel()).index_put((flat,), lp).view(cut.shape)
        return F.pad(out, (0, labels.shape[1] - length))

    @torch.no_grad()
    def _frozen_logps(self, model, data: dict) -> torch.Tensor:
        n = data["labels"].shape[0]
        step = self.micro_batch_size or n
        was_training = model.training
        model.eval()  # no (LoRA) dropout in the behaviour / reference log-probs
        try:
            parts = [
                self._token_logps(model, data, torch.arange(s, min(s + step, n), device=self.device))
                for s in range(0, n, step)
            ]
        finally:
            model.train(was_training)
        return torch.cat(parts)

    def reference_logps(self, data: dict) -> torch.Tensor:
        if self.ref_model is not None:
            return self._frozen_logps(self.ref_model, data)
        with adapters_disabled(self.model):
            return self._frozen_logps(self.model, data)

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

    def _async_episodes(self, batch: dict):
        """Queue this batch's episodes in the producer; return the oldest queued batch's once
        ``lookahead_batches`` are queued after it, without its groups that became too stale."""
        self._check_online(batch, "train")
        if self._producer is None:
            self._producer = RolloutProducer(self.rollout_engine(), self.device)
        seeds = self._seeds(batch, self.global_step)
        self._producer.submit(
            functools.partial(self._episodes, self._producer.rollout, batch, self.sampling, "train", seeds)
        )
        updates = updates_per_batch(len(batch["prompt_ids"]) * self.group_size, self.mini_batch_size, self.ppo_epochs)
        if self._producer.pending <= lookahead_batches(self.max_staleness, self.sync_interval, updates):
            return None
        rollout, total, parts = self._producer.take()
        keep = fresh_groups(rollout.versions, rollout.group_ids, self.global_step, self.max_staleness)
        before = len(rollout.group_ids)
        if len(keep) < len(set(rollout.group_ids)):
            rollout, rows = select_groups(rollout, keep)
            total, parts = total[rows], {name: values[rows] for name, values in parts.items()}
        self._stale_dropped += before - len(rollout.group_ids)
        self.log("train/stale_dropped", float(self._stale_dropped), batch_size=1)
        self._all_stale = 0 if keep else self._all_stale + 1
        if self._all_stale > MAX_ALL_STALE_BATCHES:
            raise BatchError(
                f"GRPOModule: every group of the last {self._all_stale} rollout batches was generated by "
                f"weights more than model.max_staleness={self.max_staleness} versions old; the rollout "
                "backend is not getting the new weights (check its sync), or raise model.max_staleness"
            )
        return (rollout, total, parts) if keep else None

    def _online_batch(self, rollout, total: torch.Tensor, parts: dict) -> tuple[dict, dict]:
        data = apply_loss_masks(rollout.tensors(self.tokenizer.pad_token_id or 0, self.device), rollout)
        data["rewards"] = total.to(self.device, torch.float32)
        data["versions"] = torch.tensor(rollout.versions, dtype=torch.long, device=self.device)
        lengths = torch.tensor([len(c) for c in rollout.completion_ids], dtype=torch.float32)
        stats = {f"reward/{name}": values.mean() for name, values in parts.items()}
        stats.update(
            {
                "completion_len": lengths.mean(),
                "completion_len_max": lengths.max(),
                "truncated": torch.tensor([r == "length" for r in rollout.finish_reasons], dtype=torch.float32).mean(),
                "rollout_tokens_per_sec": rollout.num_tokens / max(rollout.seconds, 1e-9),
                "weights_lag": float(self.global_step - min(rollout.versions)),
            }
        )
        return data, stats

    def _optimise(self, data: dict, stats: dict) -> None:
        mask = data["labels"] != IGNORE_INDEX
        rewards, groups = data["rewards"].float(), data["group_ids"]
        advantages = group_advantages(rewards, groups, self.scale_rewards)
        n = rewards.shape[0]
        engine_logps = data.get("engine_logps")
        if self.old_logps_source == "engine" and engine_logps is not None:
            old = engine_logps
        elif self._old_logps_in_step(n):
            old = None  # each micro-batch's own forward gives them, see _old_logps_in_step
        else:
            old = self._frozen_logps(self.model, data)
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
        ref = self.reference_logps(data) if self.kl_coef > 0 else None

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
            order = (
                torch.randperm(n, generator=shuffle).to(self.device)
                if mini < n
                else torch.arange(n, device=self.device)
            )
            for start in range(0, n, mini):
                if 0 < max_steps <= self.global_step:
                    break
                rows = order[start : start + mini]
                normalizer = mask[rows].sum() if self.aggregation == "token" else len(rows)
                for m in range(0, len(rows), micro):
                    idx = rows[m : m + micro]
                    logps = self._token_logps(self.model, data, idx)
                    if old is None:  # the policy before this (the batch's only) update: this forward
                        old_rows = logps.detach()
                        weight_rows = self._in_step_stats(old_rows, engine_logps, stale, mask, idx, sums)
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
                    if self._producer is not None:  # in turn with the queued rollouts, without waiting
                        self._producer.publish(self.model, self.global_step)
                    else:
                        self._rollout.sync(self.model, self.global_step)
        if old is None and engine_logps is not None:  # summed per micro-batch by _in_step_stats
            stats["logp_gap"] = sums["logp_gap"] / mask.sum().clamp(min=1)
            if stale is not None:
                stats["behaviour_weight"] = sums["behaviour_weight"] / mask.sum().clamp(min=1)
        self._log_step(rewards, groups, sums, tokens, updates, stats, data)

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

    def _in_step_stats(self, old_rows, engine_logps, stale, mask, idx, sums):
        """A micro-batch's share of logp_gap and, for rows of older weights, their decoupled-PPO
        weights (returned) when the old log-probs come from the training forward."""
        if engine_logps is None:
            return None
        rows_mask = mask[idx]
        sums["logp_gap"] += ((old_rows - engine_logps[idx]).abs() * rows_mask).sum()
        if stale is None:
            return None
        weights = behaviour_weights(old_rows, engine_logps[idx], stale[idx], self.behaviour_weight_cap)
        sums["behaviour_weight"] += (weights * rows_mask).sum()
        return weights

    def _log_step(self, rewards, groups, sums, tokens, updates, stats, data) -> None:
        _, group_std = group_moments(rewards, groups)
        metrics = {
            "reward": rewards.mean(),
            "reward_std": group_std.mean(),
            "zero_std_groups": (group_std < 1e-6).float().mean(),
            "loss": sums["loss"] / max(updates, 1),
        }
        if tokens.item() > 0:  # one wait per step (the progress bar waits for its values anyway)
            metrics.update({name: sums[name] / tokens for name in ("clip_frac", "ratio")})
            if self.kl_coef > 0:
                metrics["kl"] = sums["kl"] / tokens
        metrics.update(stats)
        for name, value in metrics.items():
            self.log(
                f"train/{name}",
                torch.as_tensor(value, dtype=torch.float32),
                batch_size=1,
                prog_bar=name in ("reward", "loss"),
            )
        self.log_lr()
        self.log_throughput(int(data["attention_mask"].sum()) * self.ppo_epochs, data["input_ids"].shape[1])

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

    def on_train_end(self) -> None:
        # Batches queued ahead are not trained: the run ends at max_steps or its last epoch.
        if self._producer is not None:
            self._producer.close()
            self._producer = None

    def teardown(self, stage: str) -> None:
        self.on_train_end()  # also after a failed run, so that no producer thread is left behind

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
