"""Streams from many threads and from asyncio, aborts, failing steps, shutdown, weight updates."""

import asyncio
import threading
import time

import pytest
import torch
from engine_helpers import assert_pages_released, greedy_reference, random_prompts, tiny_model

from astrai.core.engine import EngineError, InferenceEngine, SamplingParams
from astrai.core.transformer import CausalLM

DEADLINE_S = 60  # only to turn a hang into a failure; nothing here is timed


def wait_until(predicate):
    end = time.monotonic() + DEADLINE_S
    while not predicate():
        assert time.monotonic() < end, "engine did not settle"
        time.sleep(0.01)


def collect(events):
    tokens, text, finishes = {}, {}, {}
    for e in events:
        assert e.index not in finishes, "event after the sample's last one"
        tokens.setdefault(e.index, []).extend(e.token_ids)
        text[e.index] = text.get(e.index, "") + e.text
        if e.finish_reason is not None:
            finishes[e.index] = e.finish_reason
        assert e.completion_tokens == len(tokens[e.index])
    return tokens, text, finishes


def test_many_threads_stream_at_once(model, tokenizer):
    prompts = random_prompts(8, tokenizer.vocab_size, 2, 25, seed=40)
    max_tokens = [5 + 2 * i for i in range(8)]
    results, errors = {}, []
    with InferenceEngine(model, tokenizer, max_batch_size=4, max_num_batched_tokens=32, page_size=4) as engine:

        def worker(i):
            try:
                params = SamplingParams(max_tokens=max_tokens[i], temperature=0, ignore_eos=True)
                results[i] = list(engine.stream(prompts[i], params))
            except Exception as e:  # surfaced by the assertion below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(DEADLINE_S)
        assert not errors and len(results) == 8
        for i, events in results.items():
            tokens, text, finishes = collect(events)
            assert tokens[0] == greedy_reference(model, prompts[i], max_tokens[i])
            assert text[0] == tokenizer.decode(tokens[0], skip_special_tokens=True)
            assert finishes == {0: "length"} and events[-1].finish_reason == "length"
            assert all(e.prompt_tokens == len(prompts[i]) for e in events)
        wait_until(lambda: not engine.has_unfinished_requests())
        assert_pages_released(engine)


def test_asyncio_streams(model, tokenizer):
    prompts = random_prompts(6, tokenizer.vocab_size, 2, 20, seed=41)
    engine = InferenceEngine(model, tokenizer, max_batch_size=4, page_size=4)

    async def one(prompt, n):
        params = SamplingParams(max_tokens=7, temperature=0, ignore_eos=True, n=n)
        return [e async for e in engine.astream(prompt, params)]

    async def main():
        return await asyncio.gather(*(one(p, 1 + i % 2) for i, p in enumerate(prompts)))

    try:
        results = asyncio.run(main())
    finally:
        engine.shutdown()
    for i, (prompt, events) in enumerate(zip(prompts, results)):
        tokens, _, finishes = collect(events)
        n = 1 + i % 2
        assert finishes == {k: "length" for k in range(n)}
        assert [tokens[k] for k in range(n)] == [greedy_reference(model, prompt, 7)] * n
    assert_pages_released(engine)


def test_abort_mid_stream(model, tokenizer):
    prompt = random_prompts(1, tokenizer.vocab_size, 5, 5, seed=42)[0]
    params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    with InferenceEngine(model, tokenizer, page_size=4) as engine:
        events = []
        for event in engine.stream(prompt, params, request_id="to-abort"):
            events.append(event)
            if len(events) == 3:
                engine.abort("to-abort")
        assert events[-1].finish_reason == "abort"
        assert 3 <= len([t for e in events for t in e.token_ids]) < 200
        # Leaving the loop early aborts too.
        stream = engine.stream(prompt, params, request_id="left")
        next(stream)
        stream.close()
        wait_until(lambda: not engine.has_unfinished_requests())
        assert_pages_released(engine)
        # The aborted ids are free again and the engine still answers.
        assert engine.generate(prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[
            0
        ].token_ids == greedy_reference(model, prompt, 4)


def test_cancelled_asyncio_task_aborts(model, tokenizer):
    prompt = random_prompts(1, tokenizer.vocab_size, 5, 5, seed=43)[0]
    engine = InferenceEngine(model, tokenizer)

    async def main():
        seen = asyncio.Event()

        async def consume():
            async for _ in engine.astream(prompt, SamplingParams(max_tokens=200, ignore_eos=True)):
                seen.set()

        task = asyncio.create_task(consume())
        await seen.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(main())
        wait_until(lambda: not engine.has_unfinished_requests())
    finally:
        engine.shutdown()
    assert engine.stats()["generated_tokens"] < 200
    assert_pages_released(engine)


def test_abort_before_the_first_token_ends_every_sample(model, tokenizer):
    engine = InferenceEngine(model, tokenizer)
    request_id = engine.add_request([5, 6, 7], SamplingParams(n=3, max_tokens=5))
    engine.abort(request_id)
    done = engine.step()
    assert len(done) == 1 and [s.finish_reason for s in done[0].samples] == ["abort"] * 3
    assert all(s.token_ids == [] for s in done[0].samples)
    assert_pages_released(engine)


def test_stats_count_the_requests_ended_by_abort_and_nothing_else(model, tokenizer):
    engine = InferenceEngine(model, tokenizer)
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))
    dropped = engine.add_request([5, 6, 8], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.abort(dropped)
    engine.abort("no-such-request")
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.stats()["aborted_requests"] == 1
    assert engine.stats()["generated_tokens"] < 3 + 50  # the aborted one stopped early; kept ran to its end


class PoisonedLM(CausalLM):
    """A real model that fails whenever a given token is in the step (a stand-in for a kernel fault)."""

    poison = 7

    def forward(self, input_ids, *args, **kwargs):
        if bool((input_ids == self.poison).any()):
            raise RuntimeError("simulated fault in the forward pass")
        return super().forward(input_ids, *args, **kwargs)


def test_a_failing_step_fails_only_the_requests_that_fail(tokenizer):
    torch.manual_seed(0)
    model = tiny_model(tokenizer.vocab_size)
    poisoned = PoisonedLM(model.config).eval()
    poisoned.load_state_dict(model.state_dict())
    good = [p for p in random_prompts(6, tokenizer.vocab_size, 3, 12, seed=44) if PoisonedLM.poison not in p]
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    # Drive steps by hand so the bad request shares steps with the good ones.
    engine = InferenceEngine(poisoned, tokenizer, page_size=4)
    ids = {engine.add_request(p, greedy): p for p in good}
    bad = engine.add_request([5, PoisonedLM.poison, 9], greedy)
    done = {}
    while engine.has_unfinished_requests():
        for c in engine.step():
            done[c.request_id] = c
    assert done[bad].error is not None and "simulated fault" in done[bad].error
    for request_id, prompt in ids.items():
        expected = greedy_reference(model, prompt, 6)
        if PoisonedLM.poison in expected[:-1]:  # it fed the poison to the model itself
            assert done[request_id].error is not None
        else:
            assert done[request_id].error is None and done[request_id].token_ids == expected
    assert_pages_released(engine)
    # Streams and generate get the error raised, and do not hang.
    with engine:
        with pytest.raises(EngineError, match="simulated fault"):
            list(engine.stream([PoisonedLM.poison, 5], greedy))
    with pytest.raises(EngineError, match="simulated fault"):
        engine.generate([[5, 6], [PoisonedLM.poison]], greedy)
    assert_pages_released(engine)


def test_shutdown_ends_streams_in_flight(model, tokenizer):
    engine = InferenceEngine(model, tokenizer).start()
    stream = engine.stream([5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True))
    first = next(stream)
    assert first.finish_reason is None
    engine.shutdown()
    rest = list(stream)
    assert rest[-1].finish_reason == "abort"
    assert_pages_released(engine)


def test_update_weights_in_place(tokenizer):
    vocab = tokenizer.vocab_size
    old, new = tiny_model(vocab, seed=1), tiny_model(vocab, seed=2)
    prompt = random_prompts(1, vocab, 20, 20, seed=45)[0]
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    served = tiny_model(vocab, seed=1)
    engine = InferenceEngine(served, tokenizer, page_size=4)
    before = engine.generate(prompt, greedy)[0]
    assert before.token_ids == greedy_reference(old, prompt, 8) and before.weights_version == 0
    assert engine.stats()["pages_cached"] >= 5
    engine.update_weights(new.state_dict(), version=3)
    assert engine.stats()["pages_cached"] == 0  # computed with the old weights: dropped
    after = engine.generate(prompt, greedy)[0]
    assert after.token_ids == greedy_reference(new, prompt, 8) and after.weights_version == 3
    assert engine.weights_version == 3
    engine.update_weights(old, version=4)  # a module works too
    assert engine.generate(prompt, greedy)[0].token_ids == before.token_ids
    with pytest.raises(ValueError, match="missing"):
        engine.update_weights({"model.norm.weight": torch.ones(64)}, version=5)
    with pytest.raises(ValueError, match="shape mismatches"):
        engine.update_weights({**old.state_dict(), "model.norm.weight": torch.ones(3)}, version=5)
    assert engine.weights_version == 4
    assert engine.generate(prompt, greedy)[0].token_ids == before.token_ids  # nothing was half-applied
