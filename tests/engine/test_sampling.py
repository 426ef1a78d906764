"""Sampling: filters keep exactly the tokens they should, draws follow the distribution,
penalties follow their formula, seeds reproduce, logprobs match a full recompute."""

import random

import pytest
import torch
from engine_helpers import assert_pages_released, full_recompute_logits, greedy_reference, random_prompts

from astrai.core.engine import InferenceEngine, SamplingParams
from astrai.core.engine.sampler import (
    Sampler,
    SampleRow,
    apply_penalties,
    invert_cdf,
    row_uniforms,
    seeded_uniform,
    seeded_uniforms,
)

N_DRAWS = 4000


def draw(logits: torch.Tensor, params: SamplingParams, n: int = N_DRAWS, seeded: bool = False) -> torch.Tensor:
    """n draws from the same logits: unseeded rows race, seeded ones (seeds 0..n-1) invert the CDF."""
    rows = [SampleRow(params.validate(), i if seeded else None, [], [], position=7) for i in range(n)]
    tokens, _ = Sampler()(logits.expand(n, -1).clone(), rows)
    return torch.tensor(tokens)


def frequencies(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).double() / len(tokens)


@pytest.fixture
def logits():
    return torch.randn(40, generator=torch.Generator().manual_seed(0)) * 1.5


def test_plain_draws_follow_softmax_with_temperature(logits):
    for t in (0.5, 1.0, 2.0):
        expected = torch.softmax(logits.double() / t, -1)
        got = frequencies(draw(logits, SamplingParams(temperature=t)), 40)
        assert (got - expected).abs().max() < 0.035, t


def test_top_k_never_leaves_the_k_most_likely(logits):
    tokens = draw(logits, SamplingParams(top_k=5))
    top5 = set(logits.topk(5).indices.tolist())
    assert set(tokens.tolist()) == top5
    expected = torch.zeros(40, dtype=torch.float64)
    idx = list(top5)
    expected[idx] = torch.softmax(logits.double()[idx], -1)
    assert (frequencies(tokens, 40) - expected).abs().max() < 0.035


def nucleus(probs: torch.Tensor, p: float) -> set[int]:
    """Smallest set of most likely tokens whose mass reaches p, computed the slow way."""
    kept, mass = set(), 0.0
    for i in probs.argsort(descending=True).tolist():
        if mass >= p:
            break
        kept.add(i)
        mass += float(probs[i])
    return kept


def test_top_p_keeps_the_nucleus(logits):
    probs = torch.softmax(logits.double(), -1)
    kept = nucleus(probs, 0.6)
    assert 1 < len(kept) < 40
    tokens = draw(logits, SamplingParams(top_p=0.6))
    assert set(tokens.tolist()) == kept
    expected = torch.zeros(40, dtype=torch.float64)
    expected[list(kept)] = probs[list(kept)] / probs[list(kept)].sum()
    assert (frequencies(tokens, 40) - expected).abs().max() < 0.035


def test_top_k_then_top_p_on_the_renormalised_distribution(logits):
    top8 = logits.topk(8).indices
    renorm = torch.zeros(40, dtype=torch.float64)
    renorm[top8] = torch.softmax(logits.double()[top8], -1)
    kept = nucleus(renorm, 0.5)
    tokens = draw(logits, SamplingParams(top_k=8, top_p=0.5))
    assert set(tokens.tolist()) == kept


def test_min_p_drops_tokens_below_the_threshold(logits):
    probs = torch.softmax(logits.double(), -1)
    kept = {i for i in range(40) if probs[i] >= 0.2 * probs.max()}
    assert 1 < len(kept) < 40
    tokens = draw(logits, SamplingParams(min_p=0.2))
    assert set(tokens.tolist()) == kept


def test_seeded_draws_follow_the_same_filtered_distribution(logits):
    probs = torch.softmax(logits.double() / 0.8, -1)
    top = probs.topk(12).indices.tolist()
    expected = torch.zeros(40, dtype=torch.float64)
    expected[top] = probs[top] / probs[top].sum()
    tokens = draw(logits, SamplingParams(temperature=0.8, top_k=12), seeded=True)
    assert set(tokens.tolist()) <= set(top)
    assert (frequencies(tokens, 40) - expected).abs().max() < 0.035


def test_seeded_uniform_is_uniform_and_changes_with_seed_and_position():
    by_position = torch.tensor([seeded_uniform(99, p) for p in range(20000)], dtype=torch.float64)
    by_seed = torch.tensor([seeded_uniform(s, 3) for s in range(20000)], dtype=torch.float64)
    for u in (by_position, by_seed):
        assert 0 <= u.min() and u.max() < 1
        counts = torch.histc(u, bins=10, min=0, max=1)
        assert ((counts - 2000).abs() < 200).all(), counts  # ~4.5 sigma
        assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1]) < 0.03  # neighbours independent
    assert seeded_uniform(5, 0) == seeded_uniform(5, 0) != seeded_uniform(5, 1) != seeded_uniform(6, 0)


def test_the_batched_hash_equals_the_definition_bit_for_bit():
    """seeded_uniforms (int64 tensors, which wrap) against seeded_uniform (Python integers, masked)
    on 64-bit keys across the whole range, the sign bit's half included, and long positions."""
    g = random.Random(0)
    seeds = [0, 1, 2**63 - 1, 2**63, 2**64 - 1] + [g.getrandbits(64) for _ in range(3000)]
    positions = [g.choice([0, 1, 7, 2**20, 2**31 + 5, g.randrange(1 << 40)]) for _ in seeds]
    expected = torch.tensor([seeded_uniform(s, p) for s, p in zip(seeds, positions)], dtype=torch.float32)
    assert torch.equal(seeded_uniforms(seeds, positions), expected)


def test_unseeded_rows_get_no_uniform():
    params = SamplingParams(temperature=1.0)
    rows = [SampleRow(params, seed, [], [], position) for seed, position in [(None, 3), (2**64 - 1, 5), (7, 0)]]
    seeded = [r.seed is not None for r in rows]
    assert row_uniforms(rows, seeded).tolist() == [[-1.0, seeded_uniform(2**64 - 1, 5), seeded_uniform(7, 0)]]
    assert row_uniforms(rows[:1], seeded[:1]).tolist() == [[-1.0]]


def test_the_uniforms_of_later_steps_are_those_of_the_later_positions():
    params = SamplingParams(temperature=1.0)
    rows = [SampleRow(params, seed, [], [], position) for seed, position in [(None, 3), (2**63 + 11, 5), (7, 0)]]
    seeded = [r.seed is not None for r in rows]
    expected = [[-1.0, seeded_uniform(2**63 + 11, 5 + k), seeded_uniform(7, k)] for k in range(4)]
    assert row_uniforms(rows, seeded, steps=4).tolist() == expected


def test_inverting_the_cdf_never_picks_a_token_without_probability():
    probs = torch.tensor([[0.0, 0.3, 0.0, 0.7, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0, 0.0, 0.25]])  # second: unnormalised
    edges = torch.tensor([0.0, 0.29999, 0.3, 0.5, 1 - 2**-24])
    for u in edges:
        picked = invert_cdf(probs, u.expand(2)).tolist()
        assert probs[0, picked[0]] > 0 and probs[1, picked[1]] > 0, (float(u), picked)
    assert invert_cdf(probs, torch.tensor([0.2, 0.5])).tolist() == [1, 0]
    assert invert_cdf(probs, torch.tensor([0.31, 0.7])).tolist() == [3, 5]


def test_a_seeded_row_draws_the_same_token_beside_any_batch_mates(logits):
    params = SamplingParams(temperature=1.0).validate()
    row = SampleRow(params, 1234, [], [], position=11)
    alone, _ = Sampler()(logits[None].clone(), [row])
    mates = [SampleRow(params, None, [], []), SampleRow(SamplingParams(temperature=0.5).validate(), 9, [], [], 2)]
    for batch in ([row] + mates, mates + [row]):
        tokens, _ = Sampler()(logits.expand(len(batch), -1).clone(), batch)
        assert tokens[batch.index(row)] == alone[0]
    later = [Sampler()(logits[None].clone(), [SampleRow(params, 1234, [], [], position=p)])[0][0] for p in range(40)]
    assert len(set(later)) > 5  # the position moves the draw along


def test_penalties_follow_the_formula():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 12, generator=g) * 2
    prompts = [[1, 2, 3], [4, 4], [5]]
    outputs = [[2, 6, 6, 7], [], [5, 5, 5, 8]]
    params = [
        SamplingParams(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.25),
        SamplingParams(repetition_penalty=0.8),
        SamplingParams(),
    ]  # no penalties: untouched
    got = apply_penalties(logits.clone(), [SampleRow(p, None, pr, o) for p, pr, o in zip(params, prompts, outputs)])
    expected = logits.double().clone()
    for row, (p, prompt, out) in enumerate(zip(params, prompts, outputs)):
        if not p.has_penalties:
            continue
        for tok in range(12):
            count = out.count(tok)
            if tok in prompt or count:
                x = expected[row, tok]
                expected[row, tok] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
            expected[row, tok] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
    assert torch.allclose(got.double(), expected, atol=1e-6)


def test_greedy_with_penalties_matches_a_reference_loop(model, tokenizer):
    params = SamplingParams(
        max_tokens=12,
        temperature=0,
        ignore_eos=True,
        repetition_penalty=1.5,
        frequency_penalty=0.5,
        presence_penalty=0.3,
    )
    prompts = random_prompts(3, tokenizer.vocab_size, 4, 12, seed=20)
    engine = InferenceEngine(model, tokenizer, max_batch_size=4, max_num_batched_tokens=8, page_size=4)
    completions = engine.generate(prompts, params)
    for prompt, completion in zip(prompts, completions):
        ids, out = list(prompt), []
        for _ in range(12):
            x = full_recompute_logits(model, ids).double()
            for tok in set(ids):
                x[tok] = x[tok] / 1.5 if x[tok] > 0 else x[tok] * 1.5
            for tok in set(out):
                x[tok] -= 0.5 * out.count(tok) + 0.3
            out.append(int(x.argmax()))
            ids.append(out[-1])
        assert completion.token_ids == out
    # The penalties did something: plain greedy repeats itself on this model.
    assert completions[0].token_ids != greedy_reference(model, prompts[0], 12) or completions[
        1
    ].token_ids != greedy_reference(model, prompts[1], 12)


def test_temperature_near_zero_is_greedy(model, tokenizer):
    prompts = random_prompts(3, tokenizer.vocab_size, 3, 10, seed=21)
    engine = InferenceEngine(model, tokenizer)
    completions = engine.generate(prompts, SamplingParams(max_tokens=8, temperature=1e-4, ignore_eos=True))
    for prompt, completion in zip(prompts, completions):
        assert completion.token_ids == greedy_reference(model, prompt, 8)


def test_seed_reproduces_whatever_else_is_in_the_batch(model, tokenizer):
    prompt = random_prompts(1, tokenizer.vocab_size, 6, 6, seed=22)[0]
    seeded = SamplingParams(max_tokens=16, temperature=1.0, seed=1234, ignore_eos=True)
    engine = InferenceEngine(model, tokenizer, max_batch_size=8, max_num_batched_tokens=16, page_size=4)
    alone = engine.generate([prompt], seeded)[0].token_ids
    others = random_prompts(5, tokenizer.vocab_size, 2, 30, seed=23)
    mixed = engine.generate(
        others[:3] + [prompt] + others[3:],
        [SamplingParams(max_tokens=9, temperature=1.0, ignore_eos=True)] * 3
        + [seeded]
        + [SamplingParams(max_tokens=20, temperature=0.7, seed=7, ignore_eos=True)] * 2,
    )
    assert mixed[3].token_ids == alone
    other_seed = engine.generate([prompt], SamplingParams(max_tokens=16, seed=4321, ignore_eos=True))[0]
    assert other_seed.token_ids != alone


def test_seeded_samples_are_the_same_when_preempted_and_recomputed(model, tokenizer):
    prompts = random_prompts(6, tokenizer.vocab_size, 5, 14, seed=2)
    params = [SamplingParams(n=2, max_tokens=14, temperature=1.0, seed=s, ignore_eos=True) for s in range(6)]
    roomy = InferenceEngine(model, tokenizer, max_batch_size=12, page_size=4)
    tight = InferenceEngine(model, tokenizer, max_batch_size=12, max_num_batched_tokens=64, page_size=4, num_pages=14)
    want, got = roomy.generate(prompts, params), tight.generate(prompts, params)
    assert tight.stats()["preemptions"] > 0 and roomy.stats()["preemptions"] == 0
    assert [[s.token_ids for s in c.samples] for c in got] == [[s.token_ids for s in c.samples] for c in want]


def test_n_samples_share_the_prompt_and_fork(model, tokenizer):
    prompt = random_prompts(1, tokenizer.vocab_size, 10, 10, seed=24)[0]  # ends mid-page: forks copy it
    engine = InferenceEngine(model, tokenizer, page_size=4)
    c = engine.generate([prompt], SamplingParams(n=4, max_tokens=12, seed=5, ignore_eos=True))[0]
    assert [s.index for s in c.samples] == [0, 1, 2, 3]
    assert len({tuple(s.token_ids) for s in c.samples}) > 1  # independent draws
    assert c.completion_tokens == 48
    # The prompt ran through the model once: 10 prefill tokens, then 4 x 11 decode tokens;
    # the half-filled last prompt page was copied for each fork that wrote into it.
    stats = engine.stats()
    assert stats["computed_tokens"] == 10 + 4 * 11
    assert stats["page_copies"] == 3
    again = engine.generate([prompt], SamplingParams(n=4, max_tokens=12, seed=5, ignore_eos=True))[0]
    assert [s.token_ids for s in again.samples] == [s.token_ids for s in c.samples]
    first_only = engine.generate([prompt], SamplingParams(n=1, max_tokens=12, seed=5, ignore_eos=True))[0]
    assert first_only.token_ids == c.samples[0].token_ids
    assert_pages_released(engine)


def test_greedy_forks_under_preemption_equal_the_reference(model, tokenizer):
    prompts = random_prompts(3, tokenizer.vocab_size, 5, 11, seed=25)
    engine = InferenceEngine(model, tokenizer, max_batch_size=8, page_size=4, num_pages=14)
    completions = engine.generate(prompts, SamplingParams(n=3, max_tokens=14, temperature=0, ignore_eos=True))
    assert engine.stats()["preemptions"] > 0
    for prompt, c in zip(prompts, completions):
        expected = greedy_reference(model, prompt, 14)
        assert [s.token_ids for s in c.samples] == [expected] * 3
    assert_pages_released(engine)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logprobs_equal_log_softmax_of_a_full_recompute(model, tokenizer, temperature):
    prompts = random_prompts(2, tokenizer.vocab_size, 4, 9, seed=26)
    params = SamplingParams(max_tokens=6, temperature=temperature, logprobs=3, seed=3, ignore_eos=True)
    engine = InferenceEngine(model, tokenizer, max_batch_size=4, max_num_batched_tokens=6, page_size=4)
    for prompt, c in zip(prompts, engine.generate(prompts, params)):
        assert len(c.samples[0].logprobs) == len(c.token_ids) == 6
        ids = list(prompt)
        for token, lp in zip(c.token_ids, c.samples[0].logprobs):
            expected = torch.log_softmax(full_recompute_logits(model, ids).double(), -1)
            assert lp.token_id == token
            assert abs(lp.logprob - float(expected[token])) < 1e-4
            top = expected.topk(3)
            assert [t for t, _ in lp.top] == top.indices.tolist()
            assert max(abs(v - float(e)) for (_, v), e in zip(lp.top, top.values)) < 1e-4
            ids.append(token)
    only_chosen = engine.generate(prompts[:1], SamplingParams(max_tokens=2, logprobs=0, temperature=0))[0]
    assert all(lp.top == [] for lp in only_chosen.samples[0].logprobs)
    assert engine.generate(prompts[:1], SamplingParams(max_tokens=2))[0].samples[0].logprobs is None
