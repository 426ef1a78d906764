"""Structured output (SamplingParams.structured_output, llguidance masks): samples of a random
model parse and validate against the schema, whatever the model prefers; regexes hold; other
requests in the same batch are untouched; bad constraints are refused before queueing."""

from __future__ import annotations

import json
import re

import pytest

from astrai.core.engine import InferenceEngine, SamplingParams
from astrai.core.errors import AstraiError

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "enum": ["cat", "dog", "sun"]},
        "legs": {"type": "integer", "minimum": 0, "maximum": 8},
        "wild": {"type": "boolean"},
    },
    "required": ["name", "legs", "wild"],
    "additionalProperties": False,
}


def valid(doc) -> bool:
    """The schema's rules, checked by hand (an independent check of what the grammar allowed)."""
    return (
        isinstance(doc, dict)
        and set(doc) == {"name", "legs", "wild"}
        and doc["name"] in ("cat", "dog", "sun")
        and isinstance(doc["legs"], int)
        and not isinstance(doc["legs"], bool)
        and 0 <= doc["legs"] <= 8
        and isinstance(doc["wild"], bool)
    )


def test_a_hundred_samples_of_a_random_model_all_validate_against_the_schema(model, tokenizer):
    engine = InferenceEngine(model, tokenizer, max_batch_size=32)
    params = [
        SamplingParams(max_tokens=120, temperature=1.0, seed=i, structured_output={"json_schema": SCHEMA})
        for i in range(100)
    ]
    out = engine.generate(["the cat"] * 100, params)
    docs = [json.loads(c.text) for c in out]
    assert all(valid(d) for d in docs), [c.text for c in out if not valid(json.loads(c.text))][:3]
    assert all(c.finish_reason == "stop" for c in out)
    assert len({json.dumps(d, sort_keys=True) for d in docs}) > 3  # sampled, not one fixed answer


def test_json_object_and_regex_constraints_hold_beside_an_unconstrained_request(model, tokenizer):
    engine = InferenceEngine(model, tokenizer, max_batch_size=8)
    free = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    alone = engine.generate(["the dog"], free)[0]
    out = engine.generate(
        ["the dog", "the dog", "the dog"],
        [
            free,
            SamplingParams(max_tokens=200, temperature=1.0, seed=3, structured_output={"regex": r"(yes|no)-[0-9]{2}"}),
            SamplingParams(max_tokens=200, temperature=1.0, seed=4, structured_output={"json_object": True}),
        ],
    )
    assert out[0].token_ids == alone.token_ids  # its batch-mates' masks do not touch it
    assert re.fullmatch(r"(yes|no)-[0-9]{2}", out[1].text), out[1].text
    assert isinstance(json.loads(out[2].text), dict)


def test_samples_of_one_request_each_follow_the_grammar(model, tokenizer):
    engine = InferenceEngine(model, tokenizer, max_batch_size=8)
    params = SamplingParams(n=4, max_tokens=120, temperature=1.0, seed=7, structured_output={"json_schema": SCHEMA})
    (out,) = engine.generate(["hello"], params)
    assert len(out.samples) == 4 and all(valid(json.loads(s.text)) for s in out.samples)


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"json_schema": SCHEMA, "regex": "a"}, "structured_output must be one of"),
        ({"yaml": "x"}, "structured_output must be one of"),
        ({"json_object": False}, r"\['json_object'\] must be true"),
        ({"regex": ""}, r"\['regex'\] must be a non-empty string"),
        ({"lark": "start: ("}, "structured_output"),
    ],
)
def test_a_bad_constraint_is_refused_before_it_is_queued(model, tokenizer, spec, message):
    engine = InferenceEngine(model, tokenizer)
    with pytest.raises(AstraiError, match=message):
        engine.generate(["x"], SamplingParams(structured_output=spec))
    assert engine.stats()["active_requests"] == 0  # nothing was queued


def test_constrained_samples_overlap_decode_steps_and_give_the_plain_engines_tokens(model, tokenizer):
    """Through the padded DecodeRunner (the CUDA-graph path, overlapping the host's reading): a
    constrained sample and its free batch-mates come out exactly as from the plain engine,
    and the batch still overlaps its decode steps."""
    from engine_helpers import padded_engine

    params = [
        SamplingParams(max_tokens=60, temperature=1.0, seed=5, structured_output={"json_schema": SCHEMA}),
        SamplingParams(max_tokens=30, temperature=1.0, seed=6, structured_output={"regex": r"[a-z]{3,8} [0-9]+"}),
        SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=40, temperature=0.8, seed=7, ignore_eos=True),
    ]
    prompts = ["the cat", "a dog", "hello", "the sun"]
    plain = InferenceEngine(model, tokenizer, max_batch_size=8).generate(prompts, params)
    engine = padded_engine(model, tokenizer, max_batch_size=8)
    overlapped = engine.generate(prompts, params)
    assert [c.token_ids for c in overlapped] == [c.token_ids for c in plain]
    assert valid(json.loads(overlapped[0].text)) and re.fullmatch(r"[a-z]{3,8} [0-9]+", overlapped[1].text)
    assert engine.stats()["overlapped_steps"] > 10


def test_each_request_gets_a_matcher_at_the_grammars_start_and_few_grammars_are_kept(model, tokenizer, monkeypatch):
    from astrai.core.engine import structured_output

    grammars = InferenceEngine(model, tokenizer, max_batch_size=2).core.grammars
    spec = {"regex": "ab|cd"}
    first = grammars.matcher(spec)
    a = tokenizer.encode("a", add_special_tokens=False)
    assert first.consume_tokens(a)  # the first request's matcher moves on...
    second = grammars.matcher(spec)
    assert second.validate_tokens(tokenizer.encode("cd", add_special_tokens=False)) > 0  # ...the next starts over
    assert not first.validate_tokens(tokenizer.encode("cd", add_special_tokens=False))

    monkeypatch.setattr(structured_output, "CACHED_GRAMMARS", 2)
    for pattern in ("x", "y", "x", "z"):  # "y" is the least recently used when "z" comes
        grammars.matcher({"regex": pattern})
    kept = {json.loads(key)["regex"] for key in grammars._fresh}
    assert kept == {"x", "z"} and len(grammars._grammars) == 2


def test_masks_filled_in_the_thread_pool_give_the_same_samples(model, tokenizer, monkeypatch):
    from astrai.core.engine import structured_output

    params = [
        SamplingParams(max_tokens=60, temperature=1.0, seed=i, structured_output={"json_schema": SCHEMA})
        for i in range(4)
    ]
    one_by_one = InferenceEngine(model, tokenizer, max_batch_size=4).generate(["a", "b", "c", "d"], params)
    monkeypatch.setattr(structured_output, "PARALLEL_MASKS", 1)
    pooled = InferenceEngine(model, tokenizer, max_batch_size=4).generate(["a", "b", "c", "d"], params)
    assert [c.token_ids for c in pooled] == [c.token_ids for c in one_by_one]
    assert all(valid(json.loads(c.text)) for c in pooled)
