"""Prompt log-probs through /v1/completions (echo + logprobs, as lm-evaluation-harness's
local-completions model asks for them): the official openai client, a real server, and the
values of a float64 forward of the served model over the whole prompt."""

from __future__ import annotations

import copy
import math

import openai
import pytest
import torch
from conftest import MODEL_NAME

from astrai.core.auto import AutoModel
from astrai.core.tokenizer import AutoTokenizer

PROMPT = "the small model reads and writes text every day"


@torch.no_grad()
def _reference(model_dir, ids: list[int]) -> list[float]:
    model = copy.deepcopy(AutoModel.from_pretrained(model_dir)).double().eval()
    lp = model(torch.tensor([ids]))[0].log_softmax(-1)
    return [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0)


def test_echo_with_logprobs_and_no_new_tokens_scores_the_prompt(client, model_dir):
    ids = AutoTokenizer.from_pretrained(model_dir).encode(PROMPT, add_special_tokens=True)
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPT, echo=True, logprobs=2, max_tokens=0)
    choice = out.choices[0]
    assert choice.text == PROMPT and out.usage.completion_tokens == 0 and out.usage.prompt_tokens == len(ids)
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(lp.token_logprobs[1:], _reference(model_dir, ids)))
    assert all(len(top) <= 2 for top in lp.top_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset)


def test_echo_with_logprobs_and_new_tokens_lists_prompt_then_completion(client, model_dir):
    ids = AutoTokenizer.from_pretrained(model_dir).encode(PROMPT, add_special_tokens=True)
    out = client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPT,
        echo=True,
        logprobs=0,
        max_tokens=3,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    choice = out.choices[0]
    assert choice.text.startswith(PROMPT) and out.usage.completion_tokens == 3
    assert len(choice.logprobs.token_logprobs) == len(ids) + 3
    assert choice.logprobs.token_logprobs[0] is None and None not in choice.logprobs.token_logprobs[1:]


def test_echo_with_logprobs_in_a_stream_and_zero_tokens_without_echo_are_refused(client):
    with pytest.raises(openai.BadRequestError, match="without 'stream'"):
        client.completions.create(model=MODEL_NAME, prompt=PROMPT, echo=True, logprobs=1, stream=True)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=0)
