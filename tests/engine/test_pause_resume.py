"""InferenceEngine.pause / resume, the engine side of interruptible generation: while paused no
step runs and new requests wait, a weight update lands between two steps, and the requests in
flight then go on under the new weights, each streamed token stamped with the weights that
made it; greedy continuations match a full recompute with the old weights, then the new."""

import time

from engine_helpers import greedy_reference, random_prompts, tiny_model

from astrai.core.engine import InferenceEngine, SamplingParams


def paused_update(tokenizer, recompute: bool):
    """A 40-token greedy request interrupted by a pause and a weight update (version 5), plus a
    request sent while paused; returns (tokens, their versions, the late request's events, the
    old and new models, the prompt)."""
    vocab = tokenizer.vocab_size
    old, new = tiny_model(vocab, seed=1), tiny_model(vocab, seed=2)
    engine = InferenceEngine(tiny_model(vocab, seed=1), tokenizer).start()
    prompt = random_prompts(1, vocab, 12, 12, seed=3)[0]
    stream = engine.stream(prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    events = [next(stream)]
    engine.pause()
    assert engine.paused
    steps = engine.stats()["steps"]
    waiting = engine.stream(prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    time.sleep(0.2)
    assert engine.stats()["steps"] == steps and engine.stats()["waiting"] == 1  # nothing moves while paused
    engine.update_weights(new.state_dict(), version=5, recompute=recompute)
    engine.resume()
    events += list(stream)
    late = list(waiting)
    engine.shutdown()
    ids = [t for e in events for t in e.token_ids]
    versions = [e.weights_version for e in events for _ in e.token_ids]
    return ids, versions, late, old, new, prompt


def test_paused_engine_runs_no_step_and_resumes_under_new_weights(tokenizer):
    ids, versions, late, old, new, prompt = paused_update(tokenizer, recompute=True)
    switch = versions.index(5)
    assert len(ids) == 40 and 0 < switch and set(versions[:switch]) == {0} and set(versions[switch:]) == {5}
    assert ids[:switch] == greedy_reference(old, prompt, switch)  # the old weights, up to the pause
    # recompute: the rest is exactly what the new weights continue the text with
    assert ids[switch:] == greedy_reference(new, prompt + ids[:switch], 40 - switch)
    assert [t for e in late for t in e.token_ids] == greedy_reference(new, prompt, 4)
    assert {e.weights_version for e in late} == {5}


def test_without_recompute_the_old_keys_and_values_stay(tokenizer):
    ids, versions, _, old, new, prompt = paused_update(tokenizer, recompute=False)
    switch = versions.index(5)
    assert len(ids) == 40 and ids[:switch] == greedy_reference(old, prompt, switch)
    # the continuation attends to keys/values of the old weights: not the new model's own
    assert ids[switch:] != greedy_reference(new, prompt + ids[:switch], 40 - switch)


def test_resume_without_pause_is_a_no_op(tokenizer, model):
    engine = InferenceEngine(model, tokenizer)
    engine.resume()
    assert not engine.paused
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    assert len(engine.generate([[5, 6, 7]], params)[0].token_ids) == 3
