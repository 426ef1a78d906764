"""Stop conditions and text: stop strings across token boundaries, stop tokens, EOS, lengths."""

import pytest
from engine_helpers import greedy_reference, random_prompts, tiny_model

from astrai.core.engine import InferenceEngine, SamplingParams

PROMPTS = ["the cat", "hello world and", "rain tree", "river stone light", "we watch it"]


def test_text_is_the_decoded_tokens(model, tokenizer):
    engine = InferenceEngine(model, tokenizer)
    for skip in (True, False):
        params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, skip_special_tokens=skip)
        for c in engine.generate(PROMPTS, params):
            assert c.prompt_token_ids == tokenizer.encode(c.prompt, add_special_tokens=True)
            assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=skip)


def spanning_stop(tokenizer, tokens):
    """A two-character stop string made of the last character of one token and the first of the
    next, and where generation must stop: (stop, tokens kept, text kept), or None."""
    pieces = [tokenizer.decode([t]) for t in tokens]
    for i in range(1, len(tokens) - 1):
        a, b = pieces[i], pieces[i + 1]
        if not (a and b and (a[-1] + b[0]).isascii() and (a[-1] + b[0]).isprintable()):
            continue
        stop = a[-1] + b[0]
        for k in range(1, len(tokens) + 1):  # first prefix whose text contains the stop string
            text = tokenizer.decode(tokens[:k], skip_special_tokens=True)
            if stop in text:
                before = tokenizer.decode(tokens[: k - 1], skip_special_tokens=True)
                at = text.index(stop)
                if at < len(before) < at + len(stop):  # really spans a token boundary
                    return stop, tokens[:k], text[:at]
                break
    return None


def test_stop_string_spanning_two_tokens(model, tokenizer):
    engine = InferenceEngine(model, tokenizer)
    free = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    found = 0
    for prompt in PROMPTS:
        tokens = engine.generate(prompt, free)[0].token_ids
        case = spanning_stop(tokenizer, tokens)
        if case is None:
            continue
        stop, kept_tokens, kept_text = case
        params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=["never-there", stop])
        c = engine.generate(prompt, params)[0]
        assert (c.finish_reason, c.stop_reason) == ("stop", stop)
        assert c.token_ids == kept_tokens
        assert c.text == kept_text and stop not in c.text
        # Streaming: the text handed out so far is always a prefix of the final text, so no
        # part of the stop string ever reaches the caller.
        streamed = ""
        events = list(engine.stream(prompt, params))
        for event in events:
            streamed += event.text
            assert kept_text.startswith(streamed)
        assert streamed == kept_text
        assert [t for e in events for t in e.token_ids] == kept_tokens
        assert events[-1].finish_reason == "stop" and events[-1].stop_reason == stop
        found += 1
    assert found >= 2


def test_stop_token_ids(model, tokenizer):
    engine = InferenceEngine(model, tokenizer)
    prompt = tokenizer.encode("the cat", add_special_tokens=True)
    tokens = greedy_reference(model, prompt, 12)
    stop_id = next(t for t in tokens[3:] if t not in tokens[:3] and t > 4)
    cut = tokens.index(stop_id) + 1
    c = engine.generate(
        prompt, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_id], ignore_eos=True)
    )[0]
    assert c.token_ids == tokens[:cut]  # the stop token is kept in the ids...
    assert (c.finish_reason, c.stop_reason) == ("stop", stop_id)
    assert c.text == tokenizer.decode(tokens[: cut - 1], skip_special_tokens=True)  # ...not in the text


def test_eos_stops_unless_ignored(tokenizer):
    vocab = tokenizer.vocab_size
    prompt = random_prompts(1, vocab, 6, 6, seed=30)[0]
    tokens = greedy_reference(tiny_model(vocab), prompt, 12)
    eos = next(t for t in tokens[2:] if t not in tokens[:2])
    model = tiny_model(vocab, eos_token_id=eos)  # same weights, this token is EOS now
    engine = InferenceEngine(model, None)
    assert engine.eos_ids == {eos}
    c = engine.generate(prompt, SamplingParams(max_tokens=12, temperature=0))[0]
    assert c.token_ids == tokens[: tokens.index(eos) + 1]
    assert (c.finish_reason, c.stop_reason) == ("stop", None)
    ignored = engine.generate(prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert ignored.token_ids == tokens and ignored.finish_reason == "length"


def test_max_tokens_and_max_model_len(model, tokenizer):
    engine = InferenceEngine(model, tokenizer, max_model_len=20)
    prompt = random_prompts(1, tokenizer.vocab_size, 15, 15, seed=31)[0]
    c = engine.generate(prompt, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0]
    assert len(c.token_ids) == 3 and c.finish_reason == "length"
    c = engine.generate(prompt, SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))[0]
    assert len(c.token_ids) == 5 and c.finish_reason == "length"  # 15 + 5 = max_model_len
    c = engine.generate(prompt, SamplingParams(max_tokens=None, temperature=0, ignore_eos=True))[0]
    assert len(c.token_ids) == 5
    with pytest.raises(ValueError, match="max_model_len is 20"):
        engine.generate(random_prompts(1, tokenizer.vocab_size, 20, 20)[0])
