"""Bad input is refused with a ValueError that names the field, before it reaches the batch."""

import pytest
from engine_helpers import assert_pages_released, greedy_reference

from astrai.core.engine import InferenceEngine, SamplingParams, parse_bytes


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_tokens=-1), r"SamplingParams.max_tokens must be a positive integer"),
        (dict(max_tokens=0), r"SamplingParams.max_tokens"),
        (dict(temperature=-0.1), r"SamplingParams.temperature must be a number >= 0"),
        (dict(temperature=float("nan")), r"SamplingParams.temperature"),
        (dict(top_p=1.5), r"SamplingParams.top_p must be in \(0, 1\], got 1.5"),
        (dict(top_p=0.0), r"SamplingParams.top_p"),
        (dict(top_k=-2), r"SamplingParams.top_k"),
        (dict(top_k=2.5), r"SamplingParams.top_k"),
        (dict(min_p=2), r"SamplingParams.min_p"),
        (dict(repetition_penalty=0), r"SamplingParams.repetition_penalty"),
        (dict(frequency_penalty=3), r"SamplingParams.frequency_penalty must be in \[-2, 2\]"),
        (dict(n=0), r"SamplingParams.n"),
        (dict(seed="7"), r"SamplingParams.seed"),
        (dict(stop=5), r"SamplingParams.stop must be a string or a list of strings, got int"),
        (dict(stop=["ok", 3]), r"SamplingParams.stop"),
        (dict(stop=[""]), r"SamplingParams.stop must not contain empty strings"),
        (dict(stop_token_ids=[-1]), r"SamplingParams.stop_token_ids"),
        (dict(stop_token_ids=5), r"SamplingParams.stop_token_ids"),
        (dict(logprobs=-1), r"SamplingParams.logprobs"),
        (dict(ignore_eos="yes"), r"SamplingParams.ignore_eos"),
    ],
)
def test_sampling_params_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs).validate()


def test_bad_requests_are_refused_and_do_not_poison_the_engine(model, tokenizer):
    engine = InferenceEngine(model, tokenizer, max_batch_size=8, max_model_len=64)
    vocab = tokenizer.vocab_size
    cases = [
        ("", "prompt is empty"),
        ([], "prompt is empty"),
        ([5, vocab], rf"token ids \[{vocab}\] outside the vocabulary"),
        ([5, -1], "outside the vocabulary"),
        ([5, "6"], "prompt must be a string or a list of token ids"),
        (3.5, "prompt must be a string or a list of token ids"),
        (list(range(5, 69)), "prompt has 64 tokens but max_model_len is 64"),
    ]
    for prompt, message in cases:
        with pytest.raises(ValueError, match=message):
            engine.generate([prompt])
        with pytest.raises(ValueError, match=message):
            engine.stream(prompt)
    bad_params = [
        (SamplingParams(stop_token_ids=[vocab + 3]), "stop_token_ids has ids"),
        (SamplingParams(n=9), r"SamplingParams.n \(9\) exceeds the engine's max_batch_size \(8\)"),
        (SamplingParams(logprobs=vocab + 1), "SamplingParams.logprobs"),
        (SamplingParams(top_p=7), "SamplingParams.top_p"),
        ({"max_tokens": 3}, "params must be a SamplingParams"),
    ]
    for params, message in bad_params:
        with pytest.raises(ValueError, match=message):
            engine.generate([[5, 6]], params)
    # One bad prompt in a batch: nothing is queued, and the error says which one.
    with pytest.raises(ValueError, match=r"prompts\[1\]: prompt is empty"):
        engine.generate([[5, 6], ""])
    with pytest.raises(ValueError, match="params has 1 entries for 2 prompts"):
        engine.generate([[5, 6], [7]], [SamplingParams()])
    assert not engine.has_unfinished_requests() and engine.stats()["waiting"] == 0
    greedy = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    assert engine.generate([[5, 6, 7]], greedy)[0].token_ids == greedy_reference(model, [5, 6, 7], 5)
    assert_pages_released(engine)


def test_request_ids_and_tokenizer_free_use(model, tokenizer):
    engine = InferenceEngine(model, None)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        engine.generate([[5, 6]], SamplingParams(stop="x"))
    with pytest.raises(ValueError, match="no tokenizer"):
        engine.generate("hello")
    engine.add_request([5, 6], request_id="same")
    with pytest.raises(ValueError, match="'same' is already in flight"):
        engine.add_request([5, 7], request_id="same")
    while engine.has_unfinished_requests():
        engine.step()
    c = engine.generate([5, 6], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0]
    assert c.text == "" and len(c.token_ids) == 3


def test_engine_settings_are_checked(model, tokenizer):
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(8\) must be >= max_batch_size \(16\)"):
        InferenceEngine(model, tokenizer, max_batch_size=16, max_num_batched_tokens=8)
    with pytest.raises(ValueError, match="page_size must be a positive integer"):
        InferenceEngine(model, tokenizer, page_size=0)
    with pytest.raises(ValueError, match=r"max_model_len must be an integer in \[2, model max_len=256\]"):
        InferenceEngine(model, tokenizer, max_model_len=1000)
    with pytest.raises(
        ValueError, match="kv_cache_memory 'lots' is not a size; use a number of bytes or a size like 2GiB"
    ):
        InferenceEngine(model, tokenizer, kv_cache_memory="lots")
    with pytest.raises(ValueError, match="smaller than one KV page"):
        InferenceEngine(model, tokenizer, kv_cache_memory=100)
    with pytest.raises(ValueError, match="cannot be combined with num_pages"):
        InferenceEngine(model, tokenizer, num_pages=4, kv_cache_memory="1MiB")
    with pytest.raises(TypeError, match="must be a CausalLM"):
        InferenceEngine(object(), tokenizer)
    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("1.5 MB") == 1_500_000 and parse_bytes(4096) == 4096
    # A memory budget becomes a page count: 2 layers x 2 kv heads x (16 + 16) x 4 bytes per token.
    per_page = 2 * 2 * 32 * 4 * 16
    engine = InferenceEngine(model, tokenizer, page_size=16, kv_cache_memory=10 * per_page + 5)
    assert engine.allocator.num_pages == 10 and engine.max_model_len == 160
