"""GRPO rollouts through the real InferenceEngine: the engine's log-probs of the sampled tokens
agree with the policy's own recomputation (float32, 1e-4), groups share their prompt, weight
syncs are versioned and take effect, and LoRA adapters are merged into the engine's copy."""

from __future__ import annotations

import pytest
import torch
from train_helpers import TINY_MODEL

from astrai.core.engine import EngineConfig, SamplingParams
from astrai.core.tokenizer import AutoTokenizer
from astrai.train.grpo_module import GRPOModule
from astrai.train.lora import LoRAConfig, lora_layers
from astrai.train.rollout import ROLLOUT_SCHEDULER_STEPS, RolloutEngine

PROMPTS = [
    [{"role": "user", "content": "Hello world!"}],
    [{"role": "user", "content": "一二三四五。"}],
    [{"role": "user", "content": "The quick brown fox"}],
]


def make_module(tokenizer_dir, **kwargs) -> GRPOModule:
    torch.manual_seed(0)
    # A larger init than training would use, so sampled tokens and their log-probs vary a lot.
    model = {**TINY_MODEL, "init_std": 0.3}
    return GRPOModule(
        model=model,
        tokenizer=tokenizer_dir,
        rewards=[{"fn": "astrai.train.rewards.format_match"}],
        export={"on_fit_end": False},
        **kwargs,
    )


def prompt_ids(tokenizer_dir) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return [tok.apply_chat_template(m, add_generation_prompt=True) for m in PROMPTS]


def full_forward_logps(model, prompt: list[int], completion: list[int]) -> list[float]:
    """log p(completion token) from one unpadded float64 forward of prompt + completion."""
    model64 = model.double() if next(model.parameters()).dtype != torch.float64 else model
    with torch.no_grad():
        logits = model64(torch.tensor([prompt + completion]))[0].double()
    lp = logits.log_softmax(-1)
    p = len(prompt)
    return [lp[p - 1 + j, t].item() for j, t in enumerate(completion)]


def test_engine_logprobs_match_policy_recompute(tokenizer_dir):
    module = make_module(tokenizer_dir)
    engine = module.rollout_engine()
    params = SamplingParams(n=4, temperature=1.0, max_tokens=12)
    rollout = engine.generate(prompt_ids(tokenizer_dir), params, seeds=[1, 2, 3])
    assert len(rollout.completion_ids) == 12 and rollout.group_ids == [0] * 4 + [1] * 4 + [2] * 4
    assert rollout.versions == [0] * 12
    assert len({tuple(c) for c in rollout.completion_ids}) > 6  # really sampled, not one reply 12 times
    data = rollout.tensors(pad_id=0)
    mask = data["labels"] != -100
    assert int(mask.sum()) == rollout.num_tokens
    # The module's batched, padded recompute (the one training uses) ...
    policy = module._frozen_logps(module.model, data)
    gap = ((policy - data["engine_logps"]).abs() * mask).max().item()
    assert gap < 1e-4
    assert data["engine_logps"][mask].std() > 0.1  # varied log-probs, so the agreement means something
    # ... and an independent float64 forward per sequence.
    reference = make_module(tokenizer_dir).model.double()
    for i in range(len(rollout.completion_ids)):
        want = full_forward_logps(reference, rollout.prompt_ids[i], rollout.completion_ids[i])
        assert rollout.logps[i] == pytest.approx(want, abs=1e-4)


def test_rollout_tensors_layout(tokenizer_dir):
    module = make_module(tokenizer_dir)
    rollout = module.rollout_engine().generate(
        prompt_ids(tokenizer_dir)[:2], SamplingParams(n=2, max_tokens=5), seeds=[7, 8]
    )
    data = rollout.tensors(pad_id=2)
    for i, (p, c, lp) in enumerate(zip(rollout.prompt_ids, rollout.completion_ids, rollout.logps)):
        n = len(p) + len(c)
        assert data["input_ids"][i, :n].tolist() == p + c
        assert (data["input_ids"][i, n:] == 2).all() and data["attention_mask"][i].sum() == n
        labelled = (data["labels"][i] != -100).nonzero().squeeze(1).tolist()
        assert labelled == list(range(len(p) - 1, n - 1))
        assert data["labels"][i, labelled].tolist() == c
        assert data["engine_logps"][i, labelled].tolist() == pytest.approx(lp)
    assert data["group_ids"].tolist() == [0, 0, 1, 1]


def test_group_shares_the_prompt_and_seeds_reproduce(tokenizer_dir):
    module = make_module(tokenizer_dir)
    engine = module.rollout_engine()
    ids = prompt_ids(tokenizer_dir)
    params = SamplingParams(n=3, max_tokens=8)
    a = engine.generate(ids, params, seeds=[5, 6, 7])
    b = engine.generate(ids[::-1], params, seeds=[7, 6, 5])  # another order, same seed per prompt
    for g in range(3):
        prompts = {tuple(p) for p, h in zip(a.prompt_ids, a.group_ids) if h == g}
        assert prompts == {tuple(ids[g])}
        mine = [c for c, h in zip(a.completion_ids, a.group_ids) if h == g]
        theirs = [c for c, h in zip(b.completion_ids, b.group_ids) if h == 2 - g]
        assert mine == theirs
    # The group's samples shared the prompt's pages: the prefix cache saw hits.
    assert engine.engine.stats()["prefix_cache_hit_rate"] > 0


def test_sync_is_versioned_and_takes_effect(tokenizer_dir):
    module = make_module(tokenizer_dir)
    engine = module.rollout_engine()
    ids = prompt_ids(tokenizer_dir)
    greedy = SamplingParams(temperature=0.0, max_tokens=6)
    before = engine.generate(ids, greedy)
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    stale = engine.generate(ids, greedy)
    assert stale.completion_ids == before.completion_ids  # the engine has its own copy
    engine.sync(module.model, version=5)
    after = engine.generate(ids, greedy)
    assert after.versions == [5, 5, 5] and engine.version == 5
    assert after.completion_ids != before.completion_ids
    data = after.tensors(pad_id=0)
    mask = data["labels"] != -100
    gap = ((module._frozen_logps(module.model, data) - data["engine_logps"]).abs() * mask).max()
    assert gap < 1e-4  # the engine now samples from the updated policy


def test_lora_adapters_are_merged_into_the_engine(tokenizer_dir):
    module = make_module(tokenizer_dir, lora=LoRAConfig(rank=4, targets=["all-linear"]))
    with torch.no_grad():
        for layer in lora_layers(module.model):
            layer.lora_B.normal_(0, 0.5)  # adapters that change the output
    engine = module.rollout_engine()
    rollout = engine.generate(prompt_ids(tokenizer_dir), SamplingParams(n=2, max_tokens=8), seeds=[1, 2, 3])
    data = rollout.tensors(pad_id=0)
    mask = data["labels"] != -100
    with_adapters = module._frozen_logps(module.model, data)
    assert ((with_adapters - data["engine_logps"]).abs() * mask).max() < 1e-4
    base = module.reference_logps(data)  # adapters off
    assert ((base - data["engine_logps"]).abs() * mask).max() > 1e-2
    assert not any("lora" in k for k in engine.engine.model.state_dict())


def test_engine_options_and_limits(tokenizer_dir):
    module = make_module(tokenizer_dir, engine={"max_batch_size": 4, "max_model_len": 40})
    engine = module.rollout_engine()
    assert engine.engine.max_batch_size == 4 and engine.max_model_len == 40
    assert engine.engine.core.num_scheduler_steps == ROLLOUT_SCHEDULER_STEPS > 1  # decode steps in groups
    single = make_module(tokenizer_dir, engine={"num_scheduler_steps": 1}).rollout_engine()
    assert single.engine.core.num_scheduler_steps == 1  # unless the config says otherwise
    with pytest.raises(ValueError, match=r"prompt 0 has 40 tokens.*max_model_len=40.*max_prompt_len"):
        engine.generate([[5] * 40], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match=r"model.engine has no setting \['max_batch_sizes'\]"):
        make_module(tokenizer_dir, engine={"max_batch_sizes": 4})  # at start, not at the first rollout
    with pytest.raises(ValueError, match=r"model.engine.kv_cache_memory 'lots' is not a size"):
        make_module(tokenizer_dir, engine={"kv_cache_memory": "lots"})
    assert make_module(tokenizer_dir, engine={"kv_cache_memory": "2G"}).engine_config.kv_cache_bytes() == 2 * 10**9
    grouped = make_module(tokenizer_dir, group_size=96, engine=EngineConfig(max_batch_size=8))
    assert grouped.engine_config.max_batch_size == 96  # a whole group fits in one step
    with pytest.raises(ValueError, match="model.rollout_dtype"):
        make_module(tokenizer_dir, rollout_dtype="fp8")


def test_rollout_engine_directly_in_bfloat16(tokenizer_dir):
    """The engine may run in another dtype than the policy; log-probs then agree only roughly."""
    module = make_module(tokenizer_dir)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    engine = RolloutEngine(module.model, tok, dtype=torch.bfloat16)
    assert next(engine.engine.model.parameters()).dtype == torch.bfloat16
    rollout = engine.generate(prompt_ids(tokenizer_dir), SamplingParams(n=2, max_tokens=6), seeds=[1, 2, 3])
    data = rollout.tensors(pad_id=0)
    mask = data["labels"] != -100
    gap = ((module._frozen_logps(module.model, data) - data["engine_logps"]).abs() * mask).max()
    assert 0 < gap < 0.5


def test_default_kv_budget_counts_the_pool_dtype(tokenizer_dir):
    """The rollout engine's default KV budget (on a GPU) holds max_batch_size full-length
    sequences in the pool's own bytes: an fp8 cache needs half of bf16's, capped by free memory."""
    from astrai.train.rollout import DEFAULT_KV_SHARE, default_kv_budget

    model = make_module(tokenizer_dir).model
    layout, cpu = model.kv_layout(), torch.device("cpu")
    config = EngineConfig(max_batch_size=4, max_model_len=100, page_size=16)  # 7 pages a sequence
    want = 4 * 7 * 16 * layout.bytes_per_token(2)  # bf16: 2 bytes a value
    assert default_kv_budget(model, torch.bfloat16, cpu, config, free=2**40) == want
    fp8 = config.replace(kv_cache_dtype="fp8")
    assert default_kv_budget(model, torch.bfloat16, cpu, fp8, free=2**40) == want // 2
    assert default_kv_budget(model, torch.bfloat16, cpu, config, free=want) == int(DEFAULT_KV_SHARE * want)


def test_rollout_tensors_pad_every_row_and_label_only_completions_even_an_empty_one():
    from astrai.train.rollout import Rollout

    rollout = Rollout(seconds=0.0)
    for prompt, completion in (([5, 6, 7], [8, 9]), ([5], [4, 3, 2, 1]), ([5, 6], [])):
        rollout.prompt_ids.append(prompt)
        rollout.completion_ids.append(completion)
        rollout.logps.append([-0.5 * (t + 1) for t in range(len(completion))])
        rollout.group_ids.append(0)
    data = rollout.tensors(pad_id=0)
    assert data["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 4, 3, 2, 1], [5, 6, 0, 0, 0]]
    assert data["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    x = -100
    assert data["labels"].tolist() == [[x, x, 8, 9, x], [4, 3, 2, 1, x], [x, x, x, x, x]]
    assert data["engine_logps"].tolist() == [[0, 0, -0.5, -1.0, 0], [-0.5, -1.0, -1.5, -2.0, 0], [0] * 5]
    assert data["input_ids"].dtype == data["labels"].dtype == torch.long
    assert data["engine_logps"].dtype == torch.float32
