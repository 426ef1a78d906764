"""The quickstart's measures: paired changes with their standard error, the verdict rules, and
the per-question values read through the inference engine."""

from __future__ import annotations

import math
import statistics

import pytest

from astrai.core.auto import AutoModel
from astrai.core.engine import InferenceEngine, SamplingParams
from astrai.core.tokenizer import AutoTokenizer
from astrai.train.quickstart import verdict
from astrai.train.quickstart.corpus import Question
from astrai.train.quickstart.measures import greedy_answers, paired_change, sampled_rewards
from astrai.train.rewards import load_rewards, similarity

QUESTIONS = [
    Question("add", "en", f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", str(a + b), (a, b))
    for a, b in ((1, 2), (3, 4), (5, 0), (2, 2))
]


def test_paired_change_is_the_mean_difference_and_its_standard_error():
    before, after = [0.0, 1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 1.0, 1.0]
    change = paired_change(before, after)
    diffs = [a - b for a, b in zip(after, before)]
    assert change.before == pytest.approx(0.4) and change.after == pytest.approx(0.8)
    assert change.delta == pytest.approx(statistics.mean(diffs))
    assert change.stderr == pytest.approx(statistics.stdev(diffs) / math.sqrt(5))
    assert change.z == pytest.approx(change.delta / change.stderr)
    assert paired_change([1.0, 2.0], [1.0, 2.0]).z == 0.0
    assert paired_change([0.0, 0.0], [1.0, 1.0]).z == math.inf  # a change without spread
    with pytest.raises(ValueError, match="two equally long"):
        paired_change([1.0], [1.0, 2.0])


@pytest.mark.parametrize(
    "values,rule,expected",
    [
        ({"before": 6.6, "after": 0.7}, "lower", "better"),
        ({"before": 0.7, "after": 6.6}, "lower", "WORSE"),
        ({"before": 0.5, "after": 0.6, "stderr": 0.04}, "higher", "better"),
        ({"before": 0.5, "after": 0.57, "stderr": 0.04}, "higher", "same"),  # +0.07 < 2 standard errors
        ({"before": 0.5, "after": 0.4, "stderr": 0.04}, "higher", "WORSE"),
        ({"before": 0.7, "after": 0.63, "stderr": 0.04}, "not lower", "ok"),  # a drop within the noise
        ({"before": 0.7, "after": 0.6, "stderr": 0.04}, "not lower", "WORSE"),
        ({"before": 0.7, "after": 0.65}, "not lower", "WORSE"),  # no standard error: any drop counts
        ({"before": 0.7, "after": 0.7}, "not lower", "ok"),
    ],
)
def test_verdict_rules(values, rule, expected):
    assert verdict(values, rule) == expected


def _greedy_replies(model_dir, questions, max_tokens):
    tok = AutoTokenizer.from_pretrained(model_dir)
    engine = InferenceEngine(AutoModel.from_pretrained(model_dir), tok)
    prompts = [tok.apply_chat_template(q.messages(), add_generation_prompt=True) for q in questions]
    return [o.samples[0].text for o in engine.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens))]


def test_greedy_answers_marks_replies_equal_to_the_reference(chat_model_dir):
    replies = _greedy_replies(chat_model_dir, QUESTIONS, 32)
    # A question whose reference is the model's own greedy reply counts as answered.
    own = Question("add", "en", QUESTIONS[0].prompt, replies[0].strip() or "x", "3", (1, 2))
    right, got = greedy_answers(chat_model_dir, [QUESTIONS[0], own])
    assert got[0] == replies[0]
    assert right == [float(replies[0].strip() == QUESTIONS[0].reference), float(bool(replies[0].strip()))]


def test_sampled_rewards_are_per_question_means_and_repeat_with_the_seed(chat_model_dir):
    rewards = load_rewards([{"fn": "astrai.train.rewards.similarity"}])
    greedy = sampled_rewards(chat_model_dir, QUESTIONS, rewards, samples=3, temperature=0.0, max_tokens=12)
    replies = _greedy_replies(chat_model_dir, QUESTIONS, 12)
    expected = [similarity(q.prompt, r, {"reference": q.reference}) for q, r in zip(QUESTIONS, replies)]
    assert greedy == pytest.approx(expected)
    sampled = sampled_rewards(chat_model_dir, QUESTIONS, rewards, samples=4, max_tokens=12, seed=3)
    assert sampled == sampled_rewards(chat_model_dir, QUESTIONS, rewards, samples=4, max_tokens=12, seed=3)
    assert sampled != sampled_rewards(chat_model_dir, QUESTIONS, rewards, samples=4, max_tokens=12, seed=4)
    assert len(sampled) == len(QUESTIONS) and all(0.0 <= v <= 1.0 for v in sampled)
