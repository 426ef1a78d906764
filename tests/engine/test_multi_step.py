"""Multi-step decoding (num_scheduler_steps > 1): one scheduling launches several decode steps.

Run on the CPU through the padded DecodeRunner (the path CUDA graphs replay). Each later step
of a group feeds on the tokens the step before drew and moves its positions on the device, and
the host reads a group's tokens at once, so a sample can stop in the middle of a group: the
tokens must still be those of one step at a time, the stops where they were, and every page
(reserved ahead for the whole group) given back.
"""

import torch
from engine_helpers import assert_pages_released, padded_engine, random_prompts, samples, tiny_model

from astrai.core.engine import SamplingParams

VOCAB = 300
ENGINE = dict(max_batch_size=8, max_num_batched_tokens=256, page_size=4)


def one_and_grouped(model, prompts, params, steps=4, **engine):
    """Completions of a padded engine decoding one step per scheduling and of one grouping
    `steps` (same settings otherwise), and the grouping engine."""
    settings = {**ENGINE, **engine}
    single = padded_engine(model, **settings).generate(prompts, params)
    grouped_engine = padded_engine(model, num_scheduler_steps=steps, **settings)
    grouped = grouped_engine.generate(prompts, params)
    return single, grouped, grouped_engine


def test_grouped_steps_draw_the_tokens_of_single_steps_seeded_and_greedy():
    model = tiny_model(VOCAB, seed=21)
    prompts = random_prompts(6, VOCAB, 3, 20, seed=4)
    params = [
        SamplingParams(max_tokens=13 + i, temperature=[1.0, 0.7, 0.0][i % 3], seed=100 + i, logprobs=0, ignore_eos=True)
        for i in range(len(prompts))
    ]
    single, grouped, engine = one_and_grouped(model, prompts, params)
    assert samples(grouped) == samples(single)
    for a, b in zip(single, grouped):
        got = torch.tensor([lp.logprob for lp in b.samples[0].logprobs])
        want = torch.tensor([lp.logprob for lp in a.samples[0].logprobs])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    stats = engine.stats()
    assert stats["grouped_steps"] > 0.5 * stats["steps"]  # most steps ran in groups
    assert stats["generated_tokens"] == sum(len(c.samples[0].token_ids) for c in grouped)
    assert_pages_released(engine)


def test_a_sample_that_stops_inside_a_group_ends_where_single_steps_end_it():
    model = tiny_model(VOCAB, seed=22)
    prompts = random_prompts(8, VOCAB, 4, 12, seed=5)
    first = padded_engine(model, **ENGINE).generate(
        prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    )
    # Stop each sample on a token its greedy reply first writes somewhere inside a group of 8.
    params = []
    for i, c in enumerate(first):
        ids = c.samples[0].token_ids
        stop = next(t for t in ids[5 + i :] if t not in ids[: 5 + i])
        params.append(SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[stop]))
    single, grouped, engine = one_and_grouped(model, prompts, params, steps=8)
    assert samples(grouped) == samples(single)
    assert all(c.finish_reason == "stop" for c in grouped)
    assert engine.stats()["grouped_steps"] > 0
    assert engine.stats()["generated_tokens"] == sum(len(c.samples[0].token_ids) for c in grouped)  # no waste counted
    assert_pages_released(engine)


def test_a_group_never_runs_a_sample_past_its_max_tokens():
    model = tiny_model(VOCAB, seed=23)
    prompts = random_prompts(4, VOCAB, 5, 9, seed=6)
    params = [SamplingParams(max_tokens=n, temperature=1.0, seed=n, ignore_eos=True) for n in (3, 6, 10, 17)]
    single, grouped, engine = one_and_grouped(model, prompts, params, steps=8)
    assert samples(grouped) == samples(single)
    assert [len(c.samples[0].token_ids) for c in grouped] == [3, 6, 10, 17]
    assert engine.stats()["computed_tokens"] <= sum(len(p) for p in prompts) + 3 + 6 + 10 + 17
    assert_pages_released(engine)


def test_rows_that_need_the_host_every_step_run_one_step_at_a_time():
    model = tiny_model(VOCAB, seed=24)
    prompts = random_prompts(3, VOCAB, 5, 9, seed=7)
    for odd_one in (
        SamplingParams(max_tokens=10, repetition_penalty=1.3, seed=5),
        SamplingParams(max_tokens=10, logprobs=3, seed=6),
    ):
        params = [SamplingParams(max_tokens=10, seed=1, ignore_eos=True)] * 2 + [odd_one]
        single, grouped, engine = one_and_grouped(model, prompts, params, steps=4)
        assert samples(grouped) == samples(single)
        assert engine.stats()["grouped_steps"] == 0


def test_requests_beyond_the_batch_wait_for_a_group_and_are_then_admitted():
    model = tiny_model(VOCAB, seed=25)
    prompts = random_prompts(20, VOCAB, 3, 15, seed=8)
    params = SamplingParams(max_tokens=11, temperature=1.0, seed=3, ignore_eos=True)
    single, grouped, engine = one_and_grouped(model, prompts, params, steps=4, num_pages=120)
    assert samples(grouped) == samples(single)
    assert engine.stats()["grouped_steps"] > 0
    assert_pages_released(engine)
