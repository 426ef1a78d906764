"""Rollouts for GRPO: the core InferenceEngine generates groups of completions with a copy of
the policy, and that copy is refreshed in place from the policy as training goes on.

The engine holds its own model instance (in the inference dtype, e.g. bfloat16 on a GPU), so
generation never touches the training weights, their autograd state or LoRA wrappers; for a
0.1-1B model the second copy is cheap. ``sync`` copies the policy's weights (adapters merged)
into it and stamps a version number, which every rollout carries, so the trainer knows how
stale the weights that produced a sample were.

A group is one request with ``n = group_size``: its samples share the prompt's KV pages, so
the prompt is computed once per group.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from astrai.core.auto import AutoModel
from astrai.core.engine import EngineConfig, InferenceEngine, SamplingParams
from astrai.core.engine.kv_dtype import pool_dtype
from astrai.core.engine.paged_cache import PagedKVCache
from astrai.core.errors import AstraiError, require
from astrai.core.tokenizer import AutoTokenizer

from .base_module import BatchError
from .inference_dtype import resolve_dtype as resolve_dtype  # importable from here, as before
from .lora import LoRAConfig, merge_lora_state_dict
from .losses import IGNORE_INDEX

# Share of free GPU memory the engine's KV cache may take by default: training needs the rest.
DEFAULT_KV_SHARE = 0.25
# Decode steps per scheduling in the rollout engine (EngineConfig.num_scheduler_steps): a
# GRPO batch decodes hundreds of samples in lockstep, whose per-step host work (Python per
# sample) outlasted the GPU's step; grouping reads their tokens once per group. Requests all
# arrive at once, so no one waits for a group to end.
ROLLOUT_SCHEDULER_STEPS = 8


def policy_state(model: nn.Module, lora: LoRAConfig | None = None) -> dict[str, torch.Tensor]:
    """The policy's weights as a plain CausalLM state dict (LoRA adapters merged in)."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    return merge_lora_state_dict(state, lora.scaling) if lora is not None else state


@dataclass
class Rollout:
    """Flat rollout results, one entry per completion; completion i belongs to prompt group_ids[i]."""

    prompt_ids: list[list[int]] = field(default_factory=list)
    completion_ids: list[list[int]] = field(default_factory=list)
    logps: list[list[float]] = field(default_factory=list)  # engine log-probs of each completion token
    texts: list[str] = field(default_factory=list)
    finish_reasons: list[str | None] = field(default_factory=list)
    group_ids: list[int] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)  # weights version that generated each completion
    seconds: float = 0.0
    # Per completion token: 1 written by the model, 0 inserted by a workflow (a tool's answer),
    # which gets no loss (workflow.apply_loss_masks). Empty: every token is the model's.
    loss_masks: list[list[int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(map(len, self.completion_ids))

    def tensors(self, pad_id: int, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """The batch the policy trains on: prompt + completion right-padded, labels on the
        completion tokens only (labels[t] is the token after input_ids[:t+1]), and the engine's
        log-prob of each label at the same position (0 elsewhere)."""
        n = len(self.completion_ids)
        length = max(len(p) + len(c) for p, c in zip(self.prompt_ids, self.completion_ids))
        sizes = torch.tensor([len(p) + len(c) for p, c in zip(self.prompt_ids, self.completion_ids)])
        # labels[t] is the token after input_ids[:t+1]: a completion's labels start one before it
        shift = [[IGNORE_INDEX] * (len(p) - 1) for p in self.prompt_ids]
        input_ids = _padded((p + c for p, c in zip(self.prompt_ids, self.completion_ids)), n, length, pad_id, np.int64)
        labels = _padded((s + c for s, c in zip(shift, self.completion_ids)), n, length, IGNORE_INDEX, np.int64)
        logps = _padded(([0.0] * len(s) + list(lp) for s, lp in zip(shift, self.logps)), n, length, 0.0, np.float32)
        attention_mask = (torch.arange(length) < sizes[:, None]).long()
        out = {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "engine_logps": logps,
            "group_ids": torch.tensor(self.group_ids, dtype=torch.long),
        }
        return {k: v.to(device) for k, v in out.items()} if device is not None else out


def _padded(rows: Iterable[list], n: int, length: int, fill, dtype) -> torch.Tensor:
    """n rows of at most `length` values, each padded with `fill`, as one (n, length) tensor
    (through numpy's fromiter: a tensor per row cost more host time than the rest of a step's
    batch building)."""
    flat = itertools.chain.from_iterable(itertools.chain(r, itertools.repeat(fill, length - len(r))) for r in rows)
    return torch.from_numpy(np.fromiter(flat, dtype=dtype, count=n * length)).view(n, length)


class RolloutEngine:
    """An InferenceEngine over a private copy of the policy.

    Args:
        policy: the model being trained (its config and current weights are copied).
        tokenizer: decodes completions and supplies the stop tokens.
        dtype: the engine model's dtype.
        device: where the engine runs (default: the policy's device).
        lora: the policy's LoRA config, so synced weights have the adapters merged.
        engine: the engine's settings (astrai.core.engine.EngineConfig); `**settings` override
            its fields. By default the KV cache holds max_batch_size sequences of
            max_model_len tokens, and on a GPU at most a quarter of the free memory, and
            decode steps run in groups of ROLLOUT_SCHEDULER_STEPS (num_scheduler_steps).
    """

    def __init__(
        self,
        policy: nn.Module,
        tokenizer: AutoTokenizer,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        lora: LoRAConfig | None = None,
        engine: EngineConfig | None = None,
        **settings,
    ):
        device = torch.device(device) if device is not None else next(policy.parameters()).device
        self.lora = lora
        model = AutoModel.from_config(policy.config, dtype=dtype, device=device)
        model.load_state_dict(policy_state(policy, lora))
        model.requires_grad_(False)
        config = (engine or EngineConfig()).replace(**settings)
        if config.num_scheduler_steps is None:
            config = config.replace(num_scheduler_steps=ROLLOUT_SCHEDULER_STEPS)
        if device.type == "cuda" and config.num_pages is None and config.kv_cache_memory is None:
            budget = default_kv_budget(model, dtype, device, config, torch.cuda.mem_get_info(device)[0])
            config = config.replace(kv_cache_memory=budget)
        self.engine = InferenceEngine(model, tokenizer, config, device=device)
        self.version = 0

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def sync(self, policy: nn.Module, version: int) -> None:
        """Copy the policy's current weights into the engine; later rollouts carry ``version``."""
        self.engine.update_weights(policy_state(policy, self.lora), version)
        self.version = version

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, seeds: list[int] | None = None) -> Rollout:
        """``params.n`` completions of every prompt (one seeded request per prompt), with the
        log-prob of each generated token under the engine's (raw, untempered) distribution."""
        if params.logprobs is None:
            params = dataclasses.replace(params, logprobs=0)
        per_prompt = params
        if seeds is not None:
            per_prompt = [dataclasses.replace(params, seed=s) for s in seeds]
        too_long = [i for i, p in enumerate(prompt_ids) if len(p) >= self.engine.max_model_len]
        if too_long:
            i = too_long[0]
            raise ValueError(
                f"prompt {i} has {len(prompt_ids[i])} tokens, leaving no room to generate within the "
                f"engine's max_model_len={self.engine.max_model_len}; lower data.max_prompt_len or raise "
                "model.engine.max_model_len (at most the model's max_len)"
            )
        start = time.perf_counter()
        completions = self.engine.generate(prompt_ids, per_prompt)
        out = Rollout(seconds=time.perf_counter() - start)
        for g, completion in enumerate(completions):
            for sample in completion.samples:
                out.prompt_ids.append(list(completion.prompt_token_ids))
                out.completion_ids.append(list(sample.token_ids))
                out.logps.append([lp.logprob for lp in sample.logprobs or []])
                out.texts.append(sample.text)
                out.finish_reasons.append(sample.finish_reason)
                out.group_ids.append(g)
                out.versions.append(completion.weights_version)
        return out


def default_kv_budget(
    model: nn.Module, dtype: torch.dtype, device: torch.device, config: EngineConfig, free: int
) -> int:
    """KV bytes for max_batch_size sequences of max_model_len in the pool's dtype (an fp8 cache
    needs half of bf16's), at most DEFAULT_KV_SHARE of `free` bytes."""
    page_size = config.page_size
    max_len = config.max_model_len or model.config.max_len
    pages = config.max_batch_size * -(-max_len // page_size)
    stored = pool_dtype(config.kv_cache_dtype, dtype, device)
    per_page = PagedKVCache.bytes_per_page(model.kv_layout(), page_size, stored)
    return max(per_page, min(pages * per_page, int(DEFAULT_KV_SHARE * free)))


def sample_seed(*parts: int) -> int:
    """A sampling seed from integers (run seed, step, rank, prompt): the same in every process and
    run, since hash() of a tuple of ints is not salted (only str hashing is)."""
    return hash(parts) & 0x7FFF_FFFF_FFFF_FFFF


def engine_config_for(engine: EngineConfig | dict | None, needed: int) -> EngineConfig:
    """model.engine of an online strategy (GRPO, online DPO) as an EngineConfig (LightningCLI gives
    one; Python callers may pass a dict), checked now so that a bad setting fails when the run
    starts; its batch holds `needed` samples (one request of n samples runs in one step)."""
    if isinstance(engine, dict):
        unknown = sorted(set(engine) - {f.name for f in dataclasses.fields(EngineConfig)})
        require(not unknown, "model.engine", f"has no setting {unknown}; its settings are EngineConfig's fields")
        engine = EngineConfig(**engine)
    engine = engine or EngineConfig()
    try:
        engine.validate()
    except AstraiError as e:
        raise AstraiError(f"model.engine.{e}") from None
    if engine.max_batch_size < needed:
        engine = engine.replace(
            max_batch_size=needed, max_num_batched_tokens=max(engine.max_num_batched_tokens, needed)
        )
    return engine


def log_reward_metrics(module, stage: str, rollout: Rollout, total: torch.Tensor, parts: dict) -> None:
    """An evaluation batch's mean reward, each reward's mean and the completion length, logged
    by an online strategy under `stage` (val / test)."""
    n = len(rollout.texts)
    module.log(f"{stage}/reward", total.mean().float(), batch_size=n, prog_bar=True, sync_dist=True)
    for name, values in parts.items():
        module.log(f"{stage}/reward/{name}", values.mean().float(), batch_size=n, sync_dist=True)
    lengths = torch.tensor([len(c) for c in rollout.completion_ids], dtype=torch.float32)
    module.log(f"{stage}/completion_len", lengths.mean(), batch_size=n, sync_dist=True)


PROMPT_KEYS = ("prompt_ids", "prompts", "rows")  # what an online batch (data/grpo.py) holds


def check_online_batch(owner: str, batch, stage: str, served_by: str, rewards_use: str, rewards, vocab: int | None):
    """An online strategy's (GRPO, online DPO) batch of prompts: its keys, the rewards it needs,
    and (with `vocab`, once per run) its token ids; raises BatchError naming what to fix."""
    if not isinstance(batch, dict) or any(k not in batch for k in PROMPT_KEYS):
        have = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise BatchError(f"{owner}: a {stage} batch needs {list(PROMPT_KEYS)} ({served_by}), got {have}")
    if not rewards:
        raise BatchError(
            f"{owner}: {rewards_use}, but model.rewards is empty; "
            "name at least one, e.g. [{fn: astrai.train.rewards.answer_match}]"
        )
    if vocab is not None:
        bad = [t for ids in batch["prompt_ids"] for t in ids if not 0 <= t < vocab]
        if bad:
            raise BatchError(
                f"{owner}: batch['prompt_ids'] holds token id {bad[0]}, outside the model's "
                f"vocabulary 0..{vocab - 1}; was the data tokenised with another tokenizer?"
            )
