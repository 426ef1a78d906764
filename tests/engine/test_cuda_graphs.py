"""CUDA-graph decode on the GPU in bfloat16 (skipped without CUDA).

- Replaying a captured decode step computes exactly what the same padded step computes eagerly.
- Against the plain eager engine, greedy tokens agree everywhere except where the float32 model
  itself hesitates (top two logits within NEAR_TIE): bf16 GEMMs at another batch size round
  differently, so only near-ties may flip.
- Weight updates copied in place are seen by the replayed graphs.
- Padding rows write only into the scratch page.
"""

import copy
import logging

import pytest
import torch
from engine_helpers import (
    assert_pages_released,
    cache_pools,
    padded_engine,
    random_prompts,
    slots_changed,
    tiny_model,
)

from astrai.core.engine import InferenceEngine, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

VOCAB = 300
NEAR_TIE = 0.1
MLA = dict(attn_type="mla", kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16)
ARCHS = pytest.mark.parametrize("arch", [dict(qk_norm=True), MLA], ids=["gqa-qknorm", "mla"])
ENGINE = dict(max_batch_size=32, max_num_batched_tokens=256, page_size=16, kv_cache_memory="64MiB")
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=2)


def bf16_model(seed: int, **arch):
    return tiny_model(VOCAB, seed=seed, **arch).to("cuda", torch.bfloat16)


def graph_engine(model, **kwargs) -> InferenceEngine:
    engine = InferenceEngine(model, None, cuda_graphs=True, **{**ENGINE, **kwargs})
    runner = engine.core.decode_runner
    assert runner is not None and set(runner.graphs) == set(runner.buckets)
    return engine


def padded_eager_engine(model, **kwargs) -> InferenceEngine:
    """The same static buffers and padding as the graphs, run eagerly."""
    return padded_engine(model, cuda_graphs=False, **{**ENGINE, **kwargs})


def tokens(completions):
    return [c.token_ids for c in completions]


@ARCHS
@pytest.mark.parametrize("batch", [1, 3, 17, 32])
def test_replay_equals_the_same_step_run_eagerly(arch, batch):
    model = bf16_model(1, **arch)
    prompts = random_prompts(batch, VOCAB, 2, 60, seed=batch)
    engine = graph_engine(model)
    replayed = engine.generate(prompts, GREEDY)
    assert engine.core.decode_runner.num_steps >= GREEDY.max_tokens - 1
    eager = padded_eager_engine(model).generate(prompts, GREEDY)
    assert tokens(replayed) == tokens(eager)
    for a, b in zip(replayed, eager):
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.samples[0].logprobs, b.samples[0].logprobs)) < 1e-3
    assert_pages_released(engine)


def assert_same_except_near_ties(model, prompts, got, expected):
    """Greedy sequences agree, or first differ where the float32 model's top two logits nearly tie."""
    reference = copy.deepcopy(model).float()
    identical = 0
    for prompt, a, b in zip(prompts, got, expected):
        if a == b:
            identical += 1
            continue
        at = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        with torch.no_grad():
            logits = reference(torch.tensor([prompt + a[:at]], device="cuda"))[0, -1].float()
        top2 = logits.topk(2).values
        assert top2[0] - top2[1] < NEAR_TIE, (at, a[at], b[at], float(top2[0] - top2[1]))
    assert identical >= len(prompts) // 2  # near-ties are rare: most sequences agree outright


@ARCHS
@pytest.mark.parametrize("batch", [1, 3, 16, 17])
def test_graph_decode_equals_eager_decode_token_for_token(arch, batch):
    model = bf16_model(2, **arch)
    prompts = random_prompts(batch, VOCAB, 2, 60, seed=10 + batch)
    graphs = graph_engine(model).generate(prompts, GREEDY)
    eager_engine = InferenceEngine(model, None, cuda_graphs=False, **ENGINE)
    assert eager_engine.core.decode_runner is None
    eager = eager_engine.generate(prompts, GREEDY)
    assert_same_except_near_ties(model, prompts, tokens(graphs), tokens(eager))


def test_graphs_with_prefix_hits_preemption_and_forks():
    model = bf16_model(3)
    system = random_prompts(1, VOCAB, 40, 40, seed=4)[0]
    prompts = [system + tail for tail in random_prompts(6, VOCAB, 1, 20, seed=5)]
    params = SamplingParams(n=3, max_tokens=40, temperature=0.8, seed=9, ignore_eos=True)
    small = dict(kv_cache_memory=None, num_pages=14)  # 224 slots for 18 samples: preemption
    engine = graph_engine(model, **small)
    got = engine.generate(prompts, params)
    stats = engine.stats()
    assert stats["preemptions"] > 0 and stats["prefix_cache_hit_rate"] > 0
    expected = padded_eager_engine(model, **small).generate(prompts, params)
    assert [[s.token_ids for s in c.samples] for c in got] == [[s.token_ids for s in c.samples] for c in expected]
    assert_pages_released(engine)


def test_weight_update_is_seen_by_graph_replay():
    old, new = bf16_model(4), bf16_model(5)
    prompts = random_prompts(5, VOCAB, 3, 30, seed=6)
    engine = graph_engine(old)
    storage = {name: p.data_ptr() for name, p in engine.model.named_parameters()}
    before = engine.generate(prompts, GREEDY)
    engine.update_weights(new, version=2)
    assert {name: p.data_ptr() for name, p in engine.model.named_parameters()} == storage
    after = engine.generate(prompts, GREEDY)
    expected = padded_eager_engine(new).generate(prompts, GREEDY)
    assert tokens(after) == tokens(expected) != tokens(before)
    assert all(c.weights_version == 2 for c in after)


def test_padding_rows_write_only_the_scratch_page():
    model = bf16_model(6)
    engine = graph_engine(model, kv_cache_memory=None, num_pages=20, page_size=4)
    cache, ps = engine.cache, engine.page_size
    scratch = set(range(cache.scratch_page * ps, (cache.scratch_page + 1) * ps))
    assert cache.k[:, cache.scratch_page].abs().sum() > 0  # the capture's warm-up wrote its padding there
    for prompt in random_prompts(3, VOCAB, 3, 9, seed=7):
        engine.add_request(prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    running = engine.scheduler.running
    while len(running) < 3 or any(s.num_pending > 1 for s in running):
        engine.step()
    for _ in range(6):  # 3 live rows padded to the bucket of 4
        before = [pool.clone() for pool in cache_pools(cache)]
        engine.step()
        changed = slots_changed(before, cache)
        written = {s.pages[(s.num_computed - 1) // ps] * ps + (s.num_computed - 1) % ps for s in running}
        assert len(written) == 3 and written <= changed and changed - written <= scratch


def test_models_that_cannot_be_captured_run_eagerly(caplog):
    moe = tiny_model(VOCAB, ffn_type="moe", n_routed_experts=4, n_activated_experts=2, moe_ffn_dim=32).cuda()
    with caplog.at_level(logging.INFO, logger="astrai.core.engine"):
        auto = InferenceEngine(moe, None, max_batch_size=4, kv_cache_memory="16MiB")
        forced = InferenceEngine(moe, None, max_batch_size=4, kv_cache_memory="16MiB", cuda_graphs=True)
    assert auto.core.decode_runner is None and forced.core.decode_runner is None
    off = [r for r in caplog.records if "CUDA graphs off" in r.getMessage()]
    assert [r.levelno for r in off] == [logging.INFO, logging.WARNING] and "MoE" in off[0].getMessage()
    out = auto.generate(random_prompts(2, VOCAB, 3, 9, seed=8), SamplingParams(max_tokens=5, temperature=0))
    assert all(len(c.token_ids) == 5 for c in out)


def test_capture_is_logged_with_its_time(caplog):
    with caplog.at_level(logging.INFO, logger="astrai.core.engine"):
        engine = InferenceEngine(bf16_model(7), None, max_batch_size=20, kv_cache_memory="16MiB")
    runner = engine.core.decode_runner
    assert runner.buckets == [1, 2, 4, 8, 16, 20] and set(runner.graphs) == set(runner.buckets)
    assert runner.capture_seconds > 0
    assert any("captured CUDA graphs" in r.getMessage() for r in caplog.records)


def test_multi_step_groups_replay_the_graphs_and_draw_the_single_step_tokens():
    """Steps after a group's first move positions, slots and input tokens on the device between
    replays (DecodeRunner.run_steps); with every sample in lockstep the batch, and so every
    replayed step, is the single-step engine's: the seeded tokens must be the same."""
    model = bf16_model(5)
    prompts = random_prompts(20, VOCAB, 2, 60, seed=9)
    params = [SamplingParams(max_tokens=30, temperature=1.0, seed=i, logprobs=0, ignore_eos=True) for i in range(20)]
    single = graph_engine(model).generate(prompts, params)
    engine = graph_engine(model, num_scheduler_steps=8)
    grouped = engine.generate(prompts, params)
    assert tokens(grouped) == tokens(single)
    for a, b in zip(grouped, single):
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.samples[0].logprobs, b.samples[0].logprobs)) < 1e-3
    assert engine.stats()["grouped_steps"] >= 24
    assert_pages_released(engine)
