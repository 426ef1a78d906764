"""GRPO rewards: the verifiable ones, loading by import path with weights and kwargs, clear
errors, and a model as reward (checked against a plain full forward pass)."""

from __future__ import annotations

import pytest
import torch
from train_helpers import TINY_MODEL

from astrai.core.auto import AutoModel
from astrai.core.config import ModelConfig
from astrai.core.tokenizer import AutoTokenizer
from astrai.train.quickstart.corpus import add_en, add_zh, split_questions
from astrai.train.rewards import (
    RewardError,
    RewardModel,
    RewardSpec,
    answer_match,
    exact_match,
    final_number,
    format_match,
    load_rewards,
    numbers_in,
    parse_number,
    restates_question,
    score,
    similarity,
)


def scaled_length(prompt, completion, row, scale=1.0):
    """A reward defined in a test module, loaded by import path like a user's own."""
    return scale * len(completion)


class CountsWord:
    def __init__(self, word: str):
        self.word = word

    def __call__(self, prompt, completion, row):
        return completion.split().count(self.word)


def returns_nan(prompt, completion, row):
    return float("nan")


@pytest.mark.parametrize(
    "text,value",
    [
        ("7", 7),
        ("-12", -12),
        ("3.5", 3.5),
        ("七", 7),
        ("十", 10),
        ("十二", 12),
        ("二十", 20),
        ("二十一", 21),
        ("一百零五", 105),
        ("两", 2),
        ("零", 0),
        ("三四", None),
        ("seven", None),
        ("", None),
    ],
)
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_final_number_reads_the_last_numeral():
    assert final_number("3 + 4 = 7.") == 7
    assert final_number("三加四等于七。") == 7
    assert final_number("九加九等于十八。") == 18
    assert final_number("no digits here") is None


def test_answer_match_on_the_bundled_arithmetic_questions():
    """Every reference reply of the corpus scores 1 against its own answer, and 0 with a wrong sum."""
    train, held = split_questions(seed=0)
    adds = [q for q in train + held if q.task == "add"]
    assert adds
    for q in adds:
        row = {"answer": q.answer, "reference": q.reference}
        assert answer_match(q.prompt, q.reference, row) == 1.0
        assert exact_match(q.prompt, f"  {q.reference}\n", row) == 1.0
        a, b = q.operands
        wrong = add_en(a, b, a + b + 1) if q.lang == "en" else add_zh(a, b, a + b + 1)
        assert answer_match(q.prompt, wrong, row) == 0.0
        assert exact_match(q.prompt, wrong, row) == 0.0


def test_answer_match_words():
    row = {"answer": "Tuesday"}
    assert answer_match("", "After Monday comes Tuesday.", row) == 1.0
    assert answer_match("", "after monday comes tuesday", row) == 1.0
    assert answer_match("", "After Monday comes Tuesdays.", row) == 0.0  # whole words only
    assert answer_match("", "星期一之后是星期二。", {"answer": "星期二"}) == 1.0
    assert answer_match("", "3 + 4 = 17.", {"answer": "7"}) == 0.0  # numbers compare as numbers


def test_format_match():
    assert format_match("", "3 + 4 = 7.", {}) == 1.0
    assert format_match("", "三加四等于七。", {}) == 1.0
    assert format_match("", "3 + 4 = 7", {}) == 0.0
    assert format_match("", "", {}) == 0.0
    assert format_match("", "3 + 4 = 7.", {}, pattern=r"\d+ \+ \d+ = \d+\.") == 1.0
    assert format_match("", "3 plus 4 = 7.", {}, pattern=r"\d+ \+ \d+ = \d+\.") == 0.0


def test_similarity_is_the_share_of_characters_in_common():
    row = {"reference": "0 + 4 = 4."}
    assert similarity("", " 0 + 4 = 4.\n", row) == 1.0
    # '0 + 2 = 2.' vs '0 + 4 = 4.': 8 of 10 characters match in order -> 2 * 8 / 20.
    assert similarity("", "0 + 2 = 2.", row) == pytest.approx(0.8)
    assert similarity("", "", row) == 0.0
    assert similarity("", "0 + 2 = 2.", row) > similarity("", "5 + 2 = 7.", row)


def test_restates_question_checks_the_operands_before_the_result():
    assert numbers_in("What is 3 + 14? 三加十四") == [3, 14, 3, 14]
    assert restates_question("What is 0 + 4?", "0 + 4 = 5.", {}) == 1.0  # read right, summed wrong
    assert restates_question("What is 0 + 4?", "0 + 2 = 2.", {}) == 0.5
    assert restates_question("零加四等于几？", "零加四等于四。", {}) == 1.0
    assert restates_question("零加四等于几？", "二加六等于八。", {}) == 0.0
    assert restates_question("What is 3 + 4?", "3 + 4 + 5 = 12.", {}) == pytest.approx(2 / 3)  # extra numbers cost
    assert restates_question([{"role": "user", "content": "What is 1 + 2?"}], "1 + 2 = 3.", {}) == 1.0
    assert restates_question("Hello!", "Hi.", {}) == 0.0


def test_missing_column_names_it():
    with pytest.raises(RewardError, match=r"no 'answer'.*key"):
        answer_match("", "7", {"reference": "7"})


def test_load_and_score_weighted_with_kwargs():
    here = __name__
    rewards = load_rewards(
        [
            RewardSpec(fn="astrai.train.rewards.answer_match", weight=1.0),
            {"fn": f"{here}.scaled_length", "weight": 0.5, "kwargs": {"scale": 2.0}, "name": "length"},
            {"fn": f"{here}.CountsWord", "weight": -1.0, "kwargs": {"word": "no"}},
        ]
    )
    assert [r.name for r in rewards] == ["answer_match", "length", "CountsWord"]
    completions = ["3 + 4 = 7.", "no no"]
    total, parts = score(rewards, ["p", "p"], completions, [{"answer": "7"}, {"answer": "7"}])
    assert parts["answer_match"].tolist() == [1.0, 0.0]
    assert parts["length"].tolist() == [20.0, 10.0]
    assert parts["CountsWord"].tolist() == [0.0, 2.0]
    assert total.tolist() == [1.0 + 0.5 * 20.0, 0.5 * 10.0 - 2.0]


@pytest.mark.parametrize(
    "spec,match",
    [
        ({"fn": "answer_match"}, r"rewards\[0\]\.fn.*import path"),
        ({"fn": "astrai.train.no_such_module.f"}, r"rewards\[0\]\.fn: cannot import"),
        ({"fn": "astrai.train.rewards.no_such_fn"}, r"rewards\[0\]\.fn.*has no 'no_such_fn'"),
        ({"fn": "astrai.train.rewards.answer_match", "kwargs": {"colour": 1}}, r"rewards\[0\]\.kwargs"),
        ({"fn": f"{__name__}.CountsWord", "kwargs": {}}, r"rewards\[0\]\.kwargs"),
        ({"fn": "astrai.train.rewards.answer_match", "weight": float("inf")}, r"rewards\[0\]\.weight"),
        ({"func": "astrai.train.rewards.answer_match"}, r"rewards\[0\]: expected keys"),
    ],
)
def test_load_errors_name_the_entry(spec, match):
    with pytest.raises(RewardError, match=match):
        load_rewards([spec])


def test_duplicate_names_and_bad_values():
    with pytest.raises(RewardError, match="both named 'answer_match'"):
        load_rewards([{"fn": "astrai.train.rewards.answer_match"}, {"fn": "astrai.train.rewards.answer_match"}])
    rewards = load_rewards([{"fn": f"{__name__}.returns_nan"}])
    with pytest.raises(RewardError, match=r"returns_nan.*nan.*finite"):
        score(rewards, ["p"], ["c"], [{}])


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory, tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(1)
    model = AutoModel.from_config(ModelConfig.from_dict({"vocab_size": tok.vocab_size, **TINY_MODEL, "init_std": 0.5}))
    return str(AutoModel.save_pretrained(model, tmp_path_factory.mktemp("judge"), tokenizer=tok)), tok, model


def test_reward_model_is_p_yes_from_a_full_forward(judge_dir):
    path, tok, model = judge_dir
    rm = RewardModel(path, yes="Yes", no="No", batch_size=2)  # 3 completions: two batches, padded
    prompts = ["What is 1 + 1?", "Hello!", [{"role": "user", "content": "Hi"}]]
    completions = ["1 + 1 = 2.", "Hello! How can I help you?", "Hi there, how are you today?"]
    rows = [{}, {}, {}]
    got = rm.score_batch(prompts, completions, rows)
    yes, no = tok.encode("Yes")[0], tok.encode("No")[0]
    assert yes != no
    for prompt, completion, value in zip(prompts, completions, got):
        text = prompt if isinstance(prompt, str) else prompt[0]["content"]
        ids = tok.apply_chat_template(
            [{"role": "user", "content": rm.template.format(prompt=text, completion=completion)}],
            add_generation_prompt=True,
        )
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1].double()
        p = torch.softmax(logits[[yes, no]], -1)[0].item()
        assert value == pytest.approx(p, abs=1e-5)
    assert len(set(round(v, 6) for v in got)) == 3  # really depends on the input
    # Loaded by import path like any reward, scored in batches.
    loaded = load_rewards(
        [{"fn": "astrai.train.rewards.RewardModel", "kwargs": {"path": path, "yes": "Yes", "no": "No"}}]
    )
    _, parts = score(loaded, prompts, completions, rows)
    assert parts["RewardModel"].tolist() == pytest.approx(got, abs=1e-6)


def test_reward_model_errors(judge_dir, tmp_path):
    path, _, _ = judge_dir
    with pytest.raises(RewardError, match="RewardModel"):
        RewardModel(str(tmp_path / "missing"))
    rm = RewardModel(path, template="{prompt} {completion} {grade}", yes="Yes", no="No")
    with pytest.raises(RewardError, match="'grade'"):
        rm("q", "a", {})
