"""The static-buffer decode path (what CUDA graphs replay), run eagerly on the CPU.

Decode steps padded to a batch bucket must give exactly the tokens of the plain path, whatever
the scheduler does around them (prefix-cache hits, preemption, forks), for GQA and MLA; the
padding rows must write only into the scratch page, which is never handed out.
"""

import pytest
import torch
from engine_helpers import (
    ARCHS,
    MLA,
    VOCAB,
    assert_pages_released,
    both_ways,
    cache_pools,
    padded_engine,
    random_prompts,
    samples,
    slots_changed,
    tiny_model,
)

from astrai.core.engine import InferenceEngine, KernelPagedAttention, SamplingParams, TorchPagedAttention
from astrai.core.engine.cuda_graphs import batch_buckets, graph_blocker


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert batch_buckets(256) == [1, 2, 4, 8] + list(range(16, 257, 16))


@ARCHS
@pytest.mark.parametrize("batch", [1, 3, 17])
def test_padded_decode_gives_the_plain_greedy_tokens(arch, batch):
    model = tiny_model(VOCAB, seed=1, **arch)
    prompts = random_prompts(batch, VOCAB, 2, 30, seed=batch)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    plain, padded, engine = both_ways(model, prompts, params, max_batch_size=32, max_num_batched_tokens=64, page_size=4)
    assert samples(padded) == samples(plain)
    assert_pages_released(engine)


@ARCHS
def test_prefix_cache_hits(arch):
    model = tiny_model(VOCAB, seed=2, **arch)
    system = random_prompts(1, VOCAB, 20, 20, seed=3)[0]
    prompts = [system + tail for tail in random_prompts(6, VOCAB, 1, 7, seed=4)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    kwargs = dict(max_batch_size=8, page_size=4)
    plain_engine, engine = InferenceEngine(model, None, **kwargs), padded_engine(model, **kwargs)
    plain = plain_engine.generate(prompts[:1], params) + plain_engine.generate(prompts[1:], params)
    padded = engine.generate(prompts[:1], params) + engine.generate(prompts[1:], params)
    assert engine.scheduler.hit_tokens == 5 * 20  # the later prompts found the shared prefix's 5 full pages
    assert samples(padded) == samples(plain)


@ARCHS
def test_preemption_and_greedy_forks(arch):
    model = tiny_model(VOCAB, seed=3, **arch)
    prompts = random_prompts(4, VOCAB, 5, 11, seed=5)
    params = SamplingParams(n=2, max_tokens=14, temperature=0, ignore_eos=True)
    plain, padded, engine = both_ways(model, prompts, params, max_batch_size=8, page_size=4, num_pages=16)
    assert engine.stats()["preemptions"] > 0 and engine.stats()["page_copies"] > 0
    assert samples(padded) == samples(plain)
    assert_pages_released(engine)


def test_seeded_forks_draw_the_same_tokens():
    model = tiny_model(VOCAB, seed=4)
    prompts = random_prompts(3, VOCAB, 3, 9, seed=6)
    params = [
        SamplingParams(n=3, max_tokens=9, temperature=0.8, seed=s, ignore_eos=True, logprobs=2) for s in (1, 2, 3)
    ]
    plain, padded, _ = both_ways(model, prompts, params, max_batch_size=16, page_size=4)
    assert samples(padded) == samples(plain)
    for a, b in zip(plain, padded):
        for sa, sb in zip(a.samples, b.samples):
            assert [lp.top[0][0] for lp in sa.logprobs] == [lp.top[0][0] for lp in sb.logprobs]
            assert max(abs(x.logprob - y.logprob) for x, y in zip(sa.logprobs, sb.logprobs)) < 1e-5


@ARCHS
def test_padding_rows_write_only_the_scratch_page(arch):
    model = tiny_model(VOCAB, seed=5, **arch)
    engine = padded_engine(model, max_batch_size=8, page_size=4, num_pages=30)
    cache, ps = engine.cache, engine.page_size
    assert cache.scratch_page == engine.allocator.num_pages and cache.k.shape[1] == engine.allocator.num_pages + 1
    scratch = set(range(cache.scratch_page * ps, (cache.scratch_page + 1) * ps))
    for prompt in random_prompts(3, VOCAB, 3, 9, seed=7):
        engine.add_request(prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    running = engine.scheduler.running
    while len(running) < 3 or any(s.num_pending > 1 for s in running):
        engine.step()
    assert not cache.k[:, cache.scratch_page].any()  # nothing touched it during prefill
    for step in range(6):  # 3 live rows padded to the bucket of 4
        before = [pool.clone() for pool in cache_pools(cache)]
        runs = engine.core.decode_runner.num_steps
        engine.step()
        assert engine.core.decode_runner.num_steps == runs + 1
        changed = slots_changed(before, cache)
        written = {s.pages[(s.num_computed - 1) // ps] * ps + (s.num_computed - 1) % ps for s in running}
        assert len(written) == 3 and written <= changed
        assert changed - written <= scratch  # nothing else: no live or free page was written
        if step == 0:
            assert changed & scratch  # the padding row did write, into the scratch page
    while engine.has_unfinished_requests():
        engine.step()
    assert_pages_released(engine)


def test_the_scratch_page_is_never_allocated():
    model = tiny_model(VOCAB, seed=6)
    engine = padded_engine(model, max_batch_size=6, page_size=4, num_pages=13)
    for prompt in random_prompts(6, VOCAB, 4, 12, seed=8):
        engine.add_request(prompt, SamplingParams(n=2, max_tokens=14, temperature=0, ignore_eos=True))
    scratch, used_all = engine.cache.scratch_page, False
    while engine.has_unfinished_requests():
        engine.step()
        held = [p for s in engine.scheduler.running for p in s.pages]
        assert scratch not in held
        used_all |= engine.allocator.num_free == 0
    assert used_all and engine.stats()["preemptions"] > 0  # the pool ran dry and still never gave it out


def test_weight_update_keeps_storage_and_reaches_the_padded_path():
    old, new = tiny_model(VOCAB, seed=7), tiny_model(VOCAB, seed=8)
    prompts = random_prompts(5, VOCAB, 3, 12, seed=9)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    engine = padded_engine(old, max_batch_size=8, page_size=4)
    storage = {name: p.data_ptr() for name, p in engine.model.named_parameters()}
    before = engine.generate(prompts, params)
    engine.update_weights(new, version=3)
    assert {name: p.data_ptr() for name, p in engine.model.named_parameters()} == storage
    after = engine.generate(prompts, params)
    expected = InferenceEngine(new, None, max_batch_size=8, page_size=4).generate(prompts, params)
    assert samples(after) == samples(expected) != samples(before)
    assert all(c.weights_version == 3 for c in after)


def test_cuda_graphs_option(model):
    with pytest.raises(ValueError, match="cuda_graphs must be True, False or None"):
        InferenceEngine(model, None, cuda_graphs="yes")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"cuda_graphs \(True\) needs a CUDA device"):
            InferenceEngine(model, None, cuda_graphs=True)
    assert InferenceEngine(model, None, device="cpu").core.decode_runner is None
    assert InferenceEngine(model, None, device="cpu", cuda_graphs=False).core.decode_runner is None


def test_models_that_cannot_be_captured_say_why():
    kernel = KernelPagedAttention()
    assert graph_blocker(tiny_model(VOCAB), kernel) is None
    assert graph_blocker(tiny_model(VOCAB, **MLA), kernel) is None
    moe = tiny_model(VOCAB, ffn_type="moe", n_routed_experts=4, n_activated_experts=2, moe_ffn_dim=32)
    assert "MoE" in graph_blocker(moe, kernel)
    dynamic = tiny_model(VOCAB, rope_scaling={"type": "dynamic", "factor": 2.0})
    assert "dynamic NTK" in graph_blocker(dynamic, kernel)
    assert "TorchPagedAttention is not graph-safe" in graph_blocker(tiny_model(VOCAB), TorchPagedAttention())


def test_reset_stats_forgets_every_counter():
    engine = padded_engine(tiny_model(VOCAB, seed=9), max_batch_size=4, page_size=4)
    prompt = random_prompts(1, VOCAB, 9, 9, seed=10)[0]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    engine.generate(prompt, params)
    engine.generate(prompt, params)  # finds the first one's pages
    before = engine.stats()
    assert before["prefix_cache_hit_rate"] > 0 and before["overlapped_steps"] > 0
    engine.core.reset_stats()
    after = engine.stats()
    assert after["steps"] == after["generated_tokens"] == after["computed_tokens"] == after["overlapped_steps"] == 0
    assert after["prefix_cache_hit_rate"] == 0.0 and after["tokens_per_s"] == 0.0
    assert engine.core.decode_runner.num_steps == 0 and engine.core.decode_timing.by_batch == {}
    assert after["pages_cached"] == before["pages_cached"] > 0  # counters only: the cache itself stays
