"""SamplingParams.prompt_logprobs: the log-prob of every prompt token given those before it,
read from the prefill the request runs anyway; checked against a float64 forward of the whole
prompt with no cache, through chunked prefill, a warm prefix cache, n > 1 and a stream."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from engine_helpers import VOCAB, tiny_model

from astrai.core.engine import InferenceEngine, SamplingParams

PROMPT = [(7 * i + 3) % VOCAB for i in range(50)]


@torch.no_grad()
def reference(model, prompt: list[int], k: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """(log-prob of token i given tokens < i, top-k alternatives) for i >= 1, in float64."""
    model64 = copy.deepcopy(model).double()
    lp = model64(torch.tensor([prompt]))[0].log_softmax(-1)
    out = []
    for i in range(1, len(prompt)):
        values, ids = lp[i - 1].topk(k) if k else (lp[i - 1][:0], lp[i - 1][:0].long())
        out.append((float(lp[i - 1, prompt[i]]), list(zip(ids.tolist(), values.tolist()))))
    return out


def check(got, want) -> None:
    assert got[0] is None and len(got) == len(want) + 1
    for entry, (logprob, top) in zip(got[1:], want):
        assert math.isclose(entry.logprob, logprob, abs_tol=1e-4)
        assert [t for t, _ in entry.top] == [t for t, _ in top]
        assert all(math.isclose(a, b, abs_tol=1e-4) for (_, a), (_, b) in zip(entry.top, top))


@pytest.mark.parametrize("budget", [256, 16], ids=["one prefill", "chunked prefill"])
def test_prompt_logprobs_equal_a_float64_forward_of_the_whole_prompt(budget):
    model = tiny_model(VOCAB)
    want = reference(model, PROMPT, 3)
    engine = InferenceEngine(model, None, max_batch_size=4, max_num_batched_tokens=budget)
    out = engine.generate([PROMPT], SamplingParams(max_tokens=2, prompt_logprobs=3, ignore_eos=True))[0]
    check(out.prompt_logprobs, want)
    assert [e.token_id for e in out.prompt_logprobs[1:]] == PROMPT[1:]


def test_a_prompt_already_in_the_prefix_cache_still_gets_every_logprob():
    model = tiny_model(VOCAB)
    engine = InferenceEngine(model, None, max_batch_size=4, page_size=8)
    engine.generate([PROMPT], SamplingParams(max_tokens=1))  # fills the prefix cache
    assert engine.generate([PROMPT], SamplingParams(max_tokens=1))[0].prompt_logprobs is None
    hits_before = engine.stats()["prefix_cache_hit_rate"]
    out = engine.generate([PROMPT], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    check(out.prompt_logprobs, reference(model, PROMPT, 0))
    assert hits_before > 0


def test_samples_share_the_prompts_logprobs_and_a_stream_carries_them_on_its_first_event():
    model = tiny_model(VOCAB)
    engine = InferenceEngine(model, None, max_batch_size=4)
    params = SamplingParams(max_tokens=3, n=2, temperature=1.0, seed=1, prompt_logprobs=1, ignore_eos=True)
    out = engine.generate([PROMPT], params)[0]
    check(out.prompt_logprobs, reference(model, PROMPT, 1))
    with engine:
        events = list(engine.stream(PROMPT, params))
    carrying = [e for e in events if e.prompt_logprobs is not None]
    assert len(carrying) == 1 and carrying[0].index == 0 and carrying[0] is events[[e.index for e in events].index(0)]
    check(carrying[0].prompt_logprobs, reference(model, PROMPT, 1))


def test_prompt_logprobs_setting_is_checked():
    engine = InferenceEngine(tiny_model(VOCAB), None)
    with pytest.raises(ValueError, match="SamplingParams.prompt_logprobs must be None"):
        engine.generate([PROMPT], SamplingParams(prompt_logprobs=-1))
    with pytest.raises(ValueError, match="SamplingParams.prompt_logprobs asks for 301 alternatives"):
        engine.generate([PROMPT], SamplingParams(prompt_logprobs=VOCAB + 1))
