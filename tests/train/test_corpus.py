"""The bundled bilingual corpus: deterministic, correct facts, a clean held-out split."""

from __future__ import annotations

import json
import re

import pytest

from astrai.train.quickstart.corpus import (
    ANIMALS,
    WEEKDAYS_EN,
    add_en,
    add_zh,
    is_correct,
    load_questions,
    pretrain_documents,
    split_questions,
    split_rl,
    write_corpus,
    zh_number,
)

CJK = re.compile(r"[\u4e00-\u9fff]")


def read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), seed=0, n_docs=2000)


def test_same_seed_same_bytes_other_seed_other_data(tmp_path, corpus):
    again = write_corpus(tmp_path / "again", seed=0, n_docs=2000)
    other = write_corpus(tmp_path / "other", seed=1, n_docs=2000)
    for name, path in corpus.items():
        assert again[name].read_bytes() == path.read_bytes(), name
    assert other["pretrain_train"].read_bytes() != corpus["pretrain_train"].read_bytes()
    assert other["sft_heldout"].read_bytes() != corpus["sft_heldout"].read_bytes()


@pytest.mark.parametrize(
    "n,text",
    [(0, "零"), (7, "七"), (10, "十"), (11, "十一"), (18, "十八"), (20, "二十"), (35, "三十五"), (99, "九十九")],
)
def test_chinese_numerals(n, text):
    assert zh_number(n) == text


def test_every_arithmetic_statement_in_the_corpus_is_true():
    en = re.compile(r"(\d+) ([+-]) (\d+) = (\d+)\.")
    zh_values = {zh_number(n): n for n in range(21)}
    zh = re.compile(r"([零一二三四五六七八九十]+)([加减])([零一二三四五六七八九十]+)等于([零一二三四五六七八九十]+)。")
    checked = 0
    for doc in pretrain_documents(1000, seed=3):
        for a, op, b, c in en.findall(doc):
            assert (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(c), doc
            checked += 1
        for a, op, b, c in zh.findall(doc):
            a, b, c = zh_values[a], zh_values[b], zh_values[c]
            assert (a + b if op == "加" else a - b) == c, doc
            checked += 1
    assert checked > 1000


def test_documents_are_bilingual():
    docs = pretrain_documents(400, seed=0)
    chinese = sum(bool(CJK.search(d)) for d in docs)
    english = sum(bool(re.search(r"[A-Za-z]{3,}", d)) for d in docs)
    assert 100 < chinese < 350 and 100 < english < 350


def test_held_out_questions_are_never_trained_on_but_their_facts_were_read(corpus):
    train, held = split_questions(seed=0)
    held_pairs = {q.operands for q in held}
    assert len(held_pairs) == 20 and {q.lang for q in held} == {"en", "zh"} and len(held) == 100  # 5 wordings a sum
    assert not held_pairs & {q.operands for q in train if q.task == "add"}
    trained_text = "".join(
        corpus[name].read_text(encoding="utf-8") for name in ("sft_train", "dpo_questions", "grpo_train")
    )
    for q in held:
        assert q.reference not in trained_text and q.prompt not in trained_text
    pretrain = corpus["pretrain_train"].read_text(encoding="utf-8")
    assert "Q: What is" in pretrain and "问：" in pretrain  # web-style Q&A text
    for a, b in held_pairs:  # pre-training states each held-out sum, in both languages
        assert add_en(a, b) in pretrain and add_zh(a, b) in pretrain


def test_dpo_questions_are_sfts_and_its_validation_questions_the_held_out_ones(corpus):
    sft, _ = split_rl(split_questions(seed=0)[0])
    _, held = split_questions(seed=0)
    rows = read(corpus["dpo_questions"])
    assert rows == [{"prompt": q.prompt, "reference": q.reference} for q in sft if q.task != "greeting"]
    assert read(corpus["dpo_heldout_questions"]) == [{"prompt": q.prompt, "reference": q.reference} for q in held]


def test_sft_rows_are_chats_whose_reply_is_the_reference(corpus):
    rows = read(corpus["sft_train"])
    train, _ = split_rl(split_questions(seed=0)[0])
    assert len(rows) == len(train)
    for row, q in zip(rows, train):
        assert row["messages"] == [{"role": "user", "content": q.prompt}, {"role": "assistant", "content": q.reference}]
    tasks = {q.task for q in train}
    assert tasks == {"add", "weekday", "colour", "legs", "greeting"}


def test_heldout_file_round_trips_and_grpo_has_answers(corpus):
    _, held = split_questions(seed=0)
    assert load_questions(corpus["sft_heldout"]) == held
    for row, q in zip(read(corpus["grpo_val"]), held):
        assert row == {"prompt": q.prompt, "answer": q.answer, "reference": q.reference}
        assert q.answer in q.reference


def test_grpo_practises_its_own_sums_and_sfts_but_never_the_held_out_ones(corpus):
    """Three disjoint sets of sums: SFT's, GRPO's own (a quarter of the training sums, never
    asked in SFT) and the held-out ones; GRPO also practises SFT's sums, and pre-training text
    mentions all of them."""

    def sums(prompts):
        return {tuple(map(int, re.findall(r"\d+", p)[:2])) for p in prompts if re.match(r"^\D*\d+ \+ \d+", p)}

    sft = sums(r["messages"][0]["content"] for r in read(corpus["sft_train"]))
    grpo = sums(r["prompt"] for r in read(corpus["grpo_train"]))
    held = sums(r["prompt"] for r in read(corpus["grpo_val"]))
    own = grpo - sft
    assert len(own) >= 15 and len(sft) >= 3 * len(own) - 5 and len(held) >= 10
    assert sft <= grpo and not grpo & held and not sft & held
    text = " ".join(r["text"] for r in read(corpus["pretrain_train"]))
    for a, b in grpo:
        assert f"{a} + {b}" in text


def test_is_correct_is_exact_up_to_surrounding_space():
    _, held = split_questions(seed=0)
    q = held[0]
    assert is_correct(f"  {q.reference}\n", q)
    assert not is_correct(q.reference + " Also 1 + 1 = 2.", q)
    assert not is_correct(q.reference[:-1], q)
    assert WEEKDAYS_EN[0] == "Monday" and len(ANIMALS) == 8


def test_tokenizer_text_makes_the_tokenizer_encode_chinese_a_character_at_a_time(tmp_path):
    from astrai.core.tokenizer_trainer import train_tokenizer
    from astrai.train.quickstart.corpus import tokenizer_text

    assert tokenizer_text("三加四等于七。Q: 3 + 4?") == "三\n加\n四\n等\n于\n七\n。Q: 3 + 4?"
    docs = pretrain_documents(300, seed=0)
    spaced = train_tokenizer(iter([tokenizer_text(d) for d in docs]), vocab_size=600, show_progress=False)
    plain = train_tokenizer(iter(docs), vocab_size=600, show_progress=False)
    sentence = add_zh(3, 4)
    pieces = [spaced.decode([i]) for i in spaced.encode(sentence)]
    assert pieces == list(sentence)  # one token per character
    assert len(plain.encode(sentence)) < len(sentence)  # without it, whole phrases become tokens
    assert spaced.decode(spaced.encode(sentence)) == sentence


def test_the_old_corpus_module_still_runs_with_a_deprecation_warning(tmp_path):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-W", "always::DeprecationWarning", "-m", "astrai.train.corpus", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "moved to astrai.train.quickstart.corpus" in done.stderr
    assert (tmp_path / "tokenizer" / "train.jsonl").is_file()
