"""Overlapped decode: a runner decode step launches before the host reads the previous step's tokens.

Run on the CPU through the padded DecodeRunner (the path CUDA graphs replay). Whatever is
decided only when a token is read (a stop token, an abort, new weights, a request that needs
its tokens on the host) must come out exactly as in the plain engine, which never overlaps.
"""

import pytest
from engine_helpers import assert_pages_released, greedy_reference, padded_engine, random_prompts, samples, tiny_model

from astrai.core.engine import InferenceEngine, SamplingParams

VOCAB = 300
ENGINE = dict(max_batch_size=8, max_num_batched_tokens=256, page_size=4)


def plain_and_overlapped(model, prompts, params):
    """Completions of the plain engine and of the overlapping one (equal, or the test fails), and the latter."""
    plain = InferenceEngine(model, None, **ENGINE).generate(prompts, params)
    engine = padded_engine(model, **ENGINE)
    overlapped = engine.generate(prompts, params)
    assert samples(overlapped) == samples(plain)
    return plain, overlapped, engine


def test_decode_steps_overlap_and_give_the_plain_tokens():
    model = tiny_model(VOCAB, seed=11)
    prompts = random_prompts(5, VOCAB, 3, 20, seed=1)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    plain, overlapped, engine = plain_and_overlapped(model, prompts, params)
    # One prefill step gives every first token, then 11 decode steps; all but the first launch
    # while the previous tokens are in flight, and none is wasted on a sequence already at
    # max_tokens (its last token in flight ends it).
    assert engine.core.decode_runner.num_steps == 11
    assert engine.stats()["overlapped_steps"] == 10
    assert_pages_released(engine)


def test_a_stop_token_read_late_ends_the_sample_where_the_plain_engine_does():
    model = tiny_model(VOCAB, seed=12)
    prompts = random_prompts(4, VOCAB, 4, 12, seed=2)
    params = []
    for i, prompt in enumerate(prompts):
        ref = greedy_reference(model, prompt, 16)
        stop = next(t for t in ref[3 + i :] if t not in ref[: 3 + i])  # a token first produced mid-way
        params.append(SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[stop]))
    plain, overlapped, engine = plain_and_overlapped(model, prompts, params)
    assert all(c.finish_reason == "stop" and c.token_ids[-1] == c.stop_reason for c in overlapped)
    assert engine.stats()["overlapped_steps"] > 0
    assert engine.stats()["generated_tokens"] == sum(
        len(c.token_ids) for c in overlapped
    )  # the wasted rows are not counted
    assert_pages_released(engine)


def test_abort_while_a_token_is_in_flight():
    model = tiny_model(VOCAB, seed=13)
    prompts = random_prompts(3, VOCAB, 5, 9, seed=3)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    plain = InferenceEngine(model, None, **ENGINE).generate(prompts, params)
    engine = padded_engine(model, **ENGINE)
    ids = [engine.add_request(p, params) for p in prompts]
    done = {}
    while engine.stats()["overlapped_steps"] < 3:
        done.update((c.request_id, c) for c in engine.step())
    engine.abort(ids[1])
    while engine.has_unfinished_requests():
        done.update((c.request_id, c) for c in engine.step())
    aborted = done[ids[1]]
    assert aborted.finish_reason == "abort"
    assert 3 <= len(aborted.token_ids) < 20 and aborted.token_ids == plain[1].token_ids[: len(aborted.token_ids)]
    assert [done[ids[0]].token_ids, done[ids[2]].token_ids] == [plain[0].token_ids, plain[2].token_ids]
    assert_pages_released(engine)


def test_requests_that_need_their_tokens_on_the_host_mixed_with_overlapped_ones():
    model = tiny_model(VOCAB, seed=14)
    prompts = random_prompts(4, VOCAB, 4, 10, seed=4)
    params = [
        SamplingParams(max_tokens=14, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, repetition_penalty=1.5, frequency_penalty=0.5),
        SamplingParams(n=2, max_tokens=9, temperature=0.9, seed=5, ignore_eos=True, logprobs=1),
        SamplingParams(max_tokens=14, temperature=0.7, seed=6, ignore_eos=True),
    ]
    plain, overlapped, engine = plain_and_overlapped(model, prompts, params)
    assert engine.stats()["overlapped_steps"] > 0  # once the penalised request ended
    assert_pages_released(engine)


@pytest.mark.parametrize("engine_kind", ["plain", "overlapped"])
def test_pages_of_generated_tokens_reach_the_prefix_cache(engine_kind):
    model = tiny_model(VOCAB, seed=15)
    prompt = random_prompts(1, VOCAB, 6, 6, seed=5)[0]
    engine = padded_engine(model, **ENGINE) if engine_kind == "overlapped" else InferenceEngine(model, None, **ENGINE)
    first = engine.generate(prompt, SamplingParams(max_tokens=15, temperature=0, ignore_eos=True))[0]
    follow_up = prompt + first.token_ids + [7, 8, 9]  # a chat's next turn: 24 tokens of it were computed
    engine.scheduler.hit_tokens = 0
    engine.generate(follow_up, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    # Full pages of the first request, the prompt's and its computed output's alike (the very
    # last token was sampled, never fed back): (6 + 15 - 1) // 4 = 5 pages.
    assert engine.scheduler.hit_tokens == 5 * 4


def test_new_weights_wait_for_the_token_in_flight():
    old, new = tiny_model(VOCAB, seed=16), tiny_model(VOCAB, seed=17)
    prompt = random_prompts(1, VOCAB, 7, 7, seed=6)[0]
    old_tokens = greedy_reference(old, prompt, 12)  # before the engine copies new weights into `old`
    engine = padded_engine(old, **ENGINE)
    rid = engine.add_request(prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    while engine.stats()["overlapped_steps"] < 2:
        engine.step()
    known = engine.stats()["generated_tokens"]
    engine.update_weights(new, version=1)
    # The update read the token that was in flight: it came from the old weights.
    assert engine.stats()["generated_tokens"] == known + 1
    done = []
    while engine.has_unfinished_requests():
        done += engine.step()
    (c,) = done
    assert c.request_id == rid and c.weights_version == 1
    before = known + 1
    assert c.token_ids[:before] == old_tokens[:before]
    assert c.token_ids[before:] != old_tokens[before:]  # (the cached keys stay the old model's)
