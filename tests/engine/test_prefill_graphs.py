"""The static-buffer prefill path (what prefill CUDA graphs replay), run eagerly on the CPU.

Prefill and mixed steps padded to a token bucket, with unused sequence slots, must give exactly
the tokens of the plain path (chunked prompts, decode rows beside prefill chunks, prefix-cache
hits, preemption, forks) for GQA and MLA; padding tokens write only into the scratch page. In
Triton's interpreter the same engine runs the attention kernel with its program list.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from engine_helpers import (
    ARCHS,
    VOCAB,
    assert_pages_released,
    both_ways,
    cache_pools,
    needs_cuda,
    padded_prefill_engine,
    random_prompts,
    samples,
    slots_changed,
    tiny_model,
)

from astrai.core.engine import InferenceEngine, SamplingParams
from astrai.core.engine.prefill_graphs import token_buckets

HERE = Path(__file__).resolve().parent


def test_token_buckets():
    assert token_buckets(64) == [64]
    assert token_buckets(100) == [64, 100]
    assert token_buckets(2048) == [64, 128, 256, 512, 1024, 2048]
    assert token_buckets(8192) == [64, 128, 256, 512, 1024] + list(range(2048, 8193, 1024))


@ARCHS
@pytest.mark.parametrize("budget", [64, 100])
def test_padded_prefill_gives_the_plain_greedy_tokens(arch, budget):
    """Prompts up to 90 tokens under a budget of 64 or 100: chunked prefills, and steps that mix
    them with decode rows, padded to a bucket of 64 or 100 tokens."""
    model = tiny_model(VOCAB, seed=1, **arch)
    prompts = random_prompts(7, VOCAB, 2, 90, seed=budget)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    plain, padded, engine = both_ways(
        model, prompts, params, padded_prefill_engine, max_batch_size=8, max_num_batched_tokens=budget, page_size=4
    )
    assert samples(padded) == samples(plain)
    assert_pages_released(engine)


@ARCHS
def test_prefix_hits_preemption_and_forks(arch):
    model = tiny_model(VOCAB, seed=3, **arch)
    system = random_prompts(1, VOCAB, 13, 13, seed=3)[0]
    prompts = [system + tail for tail in random_prompts(5, VOCAB, 3, 11, seed=5)]
    params = SamplingParams(n=2, max_tokens=14, temperature=0, ignore_eos=True)
    plain, padded, engine = both_ways(
        model,
        prompts,
        params,
        padded_prefill_engine,
        max_batch_size=8,
        max_num_batched_tokens=64,
        page_size=4,
        num_pages=24,
    )
    assert engine.stats()["preemptions"] > 0 and engine.scheduler.hit_tokens > 0
    assert samples(padded) == samples(plain)
    assert_pages_released(engine)


@ARCHS
def test_padding_tokens_write_only_the_scratch_page(arch):
    model = tiny_model(VOCAB, seed=5, **arch)
    engine = padded_prefill_engine(model, max_batch_size=4, max_num_batched_tokens=64, page_size=4, num_pages=30)
    cache, ps = engine.cache, engine.page_size
    scratch = set(range(cache.scratch_page * ps, (cache.scratch_page + 1) * ps))
    prompts = random_prompts(2, VOCAB, 9, 9, seed=7)  # 18 tokens padded to 64
    for prompt in prompts:
        engine.add_request(prompt, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    before = [pool.clone() for pool in cache_pools(cache)]
    engine.step()
    assert engine.core.prefill_runner.num_steps == 1
    written = {s.pages[p // ps] * ps + p % ps for s in engine.scheduler.running for p in range(9)}
    changed = slots_changed(before, cache)
    assert len(written) == 18 and written <= changed
    assert changed - written <= scratch and changed & scratch  # the 46 padding tokens went there
    while engine.has_unfinished_requests():
        engine.step()
    assert_pages_released(engine)


def test_prefill_graphs_need_the_decode_graphs():
    model = tiny_model(VOCAB)
    with pytest.raises(ValueError, match="prefill_graphs .*needs the decode CUDA graphs"):
        InferenceEngine(model, None, prefill_graphs=True)
    with pytest.raises(ValueError, match="prefill_graphs must be True, False or None"):
        InferenceEngine(model, None, prefill_graphs="yes")
    # the default follows the decode graphs: off on the CPU, with no error
    assert InferenceEngine(model, None).core.prefill_runner is None


_INTERPRETED = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from engine_helpers import padded_prefill_engine, random_prompts, tiny_model
    from astrai.core.engine import InferenceEngine, KernelPagedAttention, SamplingParams
    from astrai.core.kernels.paged_attention_triton import paged_attention_triton

    class Interpreted(KernelPagedAttention):  # the Triton kernel even though the tensors are on the CPU
        def __call__(self, q, k_pool, v_pool, meta, scale, v_dim):
            return paged_attention_triton(q, k_pool, v_pool, meta.page_table, meta.context_lens, meta.query_start,
                                          scale, v_dim=v_dim, max_q_len=meta.max_query_len, blocks=meta.blocks)

    model = tiny_model(300, seed=2)
    prompts = random_prompts(3, 300, 33, 60, seed=1)  # chunks over 32 tokens: two query blocks
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    kwargs = dict(max_batch_size=4, max_num_batched_tokens=64, page_size=4)
    plain = InferenceEngine(model, None, **kwargs).generate(prompts, params)
    engine = padded_prefill_engine(model, attention_backend=Interpreted(), **kwargs)
    got = engine.generate(prompts, params)
    assert engine.core.prefill_runner.num_steps > 0
    assert [c.samples[0].token_ids for c in got] == [c.samples[0].token_ids for c in plain]
    print("listed kernel ok")
""")


# The interpreter stands in for the GPU on CPU machines; on CUDA the compiled kernel is tested.
# (The GPU image's Triton 3.6 interpreter with numpy 2.5 cannot run a loop whose bound is loaded.)
@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the compiled kernel is tested instead")
def test_the_listed_kernel_in_the_interpreter_gives_the_plain_tokens():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _INTERPRETED, str(HERE)],
        env=env,
        cwd=HERE.parents[1],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0 and "listed kernel ok" in proc.stdout, proc.stderr[-4000:]


@needs_cuda
def test_captured_prefill_graphs_give_the_eager_tokens_on_cuda():
    model = tiny_model(VOCAB, seed=7).cuda()
    prompts = random_prompts(9, VOCAB, 2, 150, seed=9)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    kwargs = dict(max_batch_size=8, max_num_batched_tokens=256, page_size=16)
    eager = InferenceEngine(model, None, prefill_graphs=False, **kwargs)
    assert eager.core.prefill_runner is None
    eager = eager.generate(prompts, params)
    engine = InferenceEngine(model, None, **kwargs)  # on by default with the decode graphs
    assert sorted(engine.core.prefill_runner.graphs) == token_buckets(256)
    # recorded without autograd: no activations kept alive, and the packed inference path
    assert not any(out.requires_grad for _, out in engine.core.prefill_runner.graphs.values())
    got = engine.generate(prompts, params)
    assert engine.core.prefill_runner.num_steps > 0
    assert samples(got) == samples(eager)
