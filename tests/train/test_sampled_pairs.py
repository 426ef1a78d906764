"""DPO pairs from a model's own wrong replies: the reference is always chosen, a rejected reply
is always one the model sampled and never the reference, and a seed repeats the pairs."""

from __future__ import annotations

import json

import pytest

from astrai.core.auto import AutoModel
from astrai.core.engine import InferenceEngine, SamplingParams
from astrai.core.tokenizer import AutoTokenizer
from astrai.train.sampled_pairs import main, read_questions, sample_pairs

QUESTIONS = [
    {"prompt": f"What is {a} + {b}?", "reference": f"{a} + {b} = {a + b}."} for a, b in ((1, 2), (3, 4), (6, 1))
]


def _samples(model_dir, prompt, n, seed):
    tok = AutoTokenizer.from_pretrained(model_dir)
    engine = InferenceEngine(AutoModel.from_pretrained(model_dir), tok)
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    out = engine.generate([ids], SamplingParams(n=n, temperature=1.0, max_tokens=32, seed=seed))[0]
    return [s.text.strip() for s in out.samples]


def test_pairs_put_the_reference_against_distinct_sampled_wrong_replies(chat_model_dir):
    pairs = sample_pairs(chat_model_dir, QUESTIONS, samples=6, per_question=3, seed=5)
    assert pairs, "a random-weight model gets these sums wrong"
    for q in QUESTIONS:
        mine = [p for p in pairs if p["prompt"] == q["prompt"]]
        assert 1 <= len(mine) <= 3 and all(p["chosen"] == q["reference"] for p in mine)
        rejected = [p["rejected"] for p in mine]
        assert len(set(rejected)) == len(rejected) and q["reference"] not in rejected
    # The first question's rejected replies are its own samples (seed 5 * 1_000_003 + 0), in order.
    samples = _samples(chat_model_dir, QUESTIONS[0]["prompt"], 6, 5 * 1_000_003)
    first = [p["rejected"] for p in pairs if p["prompt"] == QUESTIONS[0]["prompt"]]
    assert first == list(dict.fromkeys(s for s in samples if s and s != QUESTIONS[0]["reference"]))[:3]
    assert sample_pairs(chat_model_dir, QUESTIONS, samples=6, per_question=3, seed=5) == pairs


def test_a_question_the_model_always_answers_right_gives_no_pair(chat_model_dir):
    greedy = sample_pairs(chat_model_dir, QUESTIONS[:1], samples=2, temperature=0.0)
    assert len(greedy) == 1  # both greedy replies are the same wrong one
    answered = [{"prompt": QUESTIONS[0]["prompt"], "reference": greedy[0]["rejected"]}]
    assert sample_pairs(chat_model_dir, answered, samples=4, temperature=0.0) == []


def test_command_writes_dpo_rows_and_names_a_bad_field(tmp_path, chat_model_dir, capsys):
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    out = tmp_path / "pairs" / "train.jsonl"
    assert main(["--model", str(chat_model_dir), "--questions", str(questions), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(set(r) == {"prompt", "chosen", "rejected"} for r in rows)
    assert f"{len(rows)} pairs -> {out}" in capsys.readouterr().out
    questions.write_text(json.dumps({"prompt": "What is 1 + 1?", "reference": ""}) + "\n")
    with pytest.raises(ValueError, match=r"q.jsonl, row 1: field 'reference' must be a non-empty string"):
        read_questions(questions)
