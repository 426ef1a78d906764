"""GRPO data: online prompt batches keep the whole row for the rewards; offline rows become one
sequence per response with labels on the response only; bad rows are named, never dropped
silently. Token ids are worked out by hand with the word tokenizer of data_helpers."""

from __future__ import annotations

import pytest
from data_helpers import ASSISTANT, IM_END, IM_START, NL, USER, VOCAB, ids, word_tokenizer, write_jsonl

from astrai.train.data.grpo import GRPODataModule
from astrai.train.data.records import DataError

IGNORE = -100


def prompt_ids(text: str) -> list[int]:
    return [IM_START, USER, NL, *ids(text), IM_END, NL, IM_START, ASSISTANT, NL]


@pytest.fixture
def tok(tmp_path):
    return word_tokenizer(tmp_path / "tok")


def build(tok, tmp_path, train_rows, **kwargs) -> GRPODataModule:
    dm = GRPODataModule(
        tok, write_jsonl(tmp_path / "train.jsonl", train_rows), cache_dir=str(tmp_path / "cache"), **kwargs
    )
    dm.setup("fit")
    return dm


def test_online_batches_carry_prompt_ids_and_whole_rows(tok, tmp_path):
    rows = [
        {"prompt": "what is one", "answer": "one", "extra": [1, 2]},
        {
            "prompt": [{"role": "system", "content": "hi"}, {"role": "user", "content": "what is two"}],
            "answer": "two",
            "extra": [3],
        },
    ]
    dm = build(tok, tmp_path, rows, batch_size=2)
    assert dm.offline is False
    batch = next(iter(dm.train_dataloader()))
    assert sorted(batch) == ["prompt_ids", "prompts", "rows"]
    by_answer = {r["answer"]: (p, q, r) for p, q, r in zip(batch["prompt_ids"], batch["prompts"], batch["rows"])}
    p, prompt, row = by_answer["one"]
    assert p == prompt_ids("what is one")
    assert prompt == "what is one" and row == rows[0]
    p, prompt, row = by_answer["two"]
    assert p == [IM_START, VOCAB["system"], NL, VOCAB["hi"], IM_END, NL, *prompt_ids("what is two")]
    assert prompt == rows[1]["prompt"] and row == rows[1]


def test_offline_batches_one_sequence_per_response(tok, tmp_path):
    rows = [
        {"prompt": "what is one", "responses": ["one", "two three", "bad"], "rewards": [1.0, 0.0, -1]},
        {"prompt": "hi", "responses": ["yo", "hi"], "rewards": [0.5, 0.25]},
    ]
    dm = build(tok, tmp_path, rows, batch_size=2)
    assert dm.offline is True
    loader = dm.train_dataloader()
    loader.sampler.shuffle = False
    batch = next(iter(loader))
    assert batch["group_ids"].tolist() == [0, 0, 0, 1, 1]
    assert batch["rewards"].tolist() == [1.0, 0.0, -1.0, 0.5, 0.25]
    want = [
        (prompt_ids("what is one"), ids("one")),
        (prompt_ids("what is one"), ids("two three")),
        (prompt_ids("what is one"), ids("bad")),
        (prompt_ids("hi"), ids("yo")),
        (prompt_ids("hi"), ids("hi")),
    ]
    length = max(len(p) + len(c) + 1 for p, c in want)
    assert batch["input_ids"].shape == (5, length)
    for i, (p, c) in enumerate(want):
        seq = p + c + [IM_END]  # the reply ends with its end-of-turn token (as generated), not the newline after it
        n = len(seq)
        assert batch["input_ids"][i, :n].tolist() == seq
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (length - n)
        labels = [IGNORE] * (len(p) - 1) + c + [IM_END] + [IGNORE] * (length - n + 1)
        assert batch["labels"][i].tolist() == labels


def test_validation_rows_are_served_as_prompts(tok, tmp_path):
    offline = [{"prompt": "what is one", "responses": ["one", "two"], "rewards": [1, 0]}]
    val = write_jsonl(tmp_path / "val.jsonl", offline + [{"prompt": "hi", "responses": ["a", "b"], "rewards": [0, 1]}])
    dm = build(tok, tmp_path, offline, val=val, batch_size=1, val_batch_size=2)
    batch = next(iter(dm.val_dataloader()))
    assert batch["prompt_ids"] == [prompt_ids("what is one"), prompt_ids("hi")]
    assert batch["rows"][1]["responses"] == ["a", "b"]


@pytest.mark.parametrize(
    "row,match",
    [
        ({"prompt": "hi", "responses": ["a"], "rewards": [1.0]}, r"row 1: field 'responses'.*at least 2"),
        ({"prompt": "hi", "responses": ["a", "b"], "rewards": [1.0]}, r"field 'rewards'.*2 numbers"),
        (
            {"prompt": "hi", "responses": ["a", "b"], "rewards": [1.0, "x"]},
            r"field 'rewards\[1\]': must be a finite number",
        ),
        ({"prompt": "hi", "responses": ["a", ""], "rewards": [1.0, 0.0]}, r"field 'responses\[1\]': is empty"),
        ({"prompt": "", "responses": ["a", "b"], "rewards": [1.0, 0.0]}, r"field 'prompt': is empty"),
    ],
)
def test_bad_offline_rows_are_named(tok, tmp_path, row, match):
    with pytest.raises(DataError, match=match):
        build(tok, tmp_path, [row])


def test_bad_rows_are_skipped_and_counted_on_request(tok, tmp_path):
    rows = [{"prompt": "hi", "answer": "a"}, {"prompt": None, "answer": "b"}, {"prompt": "yo", "answer": "c"}]
    with pytest.raises(DataError, match="row 2: field 'prompt': is missing"):
        build(tok, tmp_path, rows)
    dm = build(tok, tmp_path / "skip", rows, skip_bad_rows=True)
    assert len(dm.train_dataset) == 2 and dm.skipped == {"train": 1}


def test_limits_and_format_errors(tok, tmp_path):
    with pytest.raises(DataError, match=r"has 13 tokens, more than data.max_prompt_len=10"):
        build(tok, tmp_path, [{"prompt": "what is one"}], max_prompt_len=10)
    long = {"prompt": "hi", "responses": ["a b c d e f g h", "a"], "rewards": [1, 0]}
    with pytest.raises(DataError, match=r"more than data.max_len=20"):
        build(tok, tmp_path / "e", [long], max_len=20, overlong="error")
    dm = build(tok, tmp_path / "t", [long], max_len=20)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[1] == 20 and dm.truncated == {"train": 1}
    with pytest.raises(DataError, match=r"no column 'prompt'.*GRPO rows need"):
        build(tok, tmp_path / "c", [{"question": "hi"}])
    with pytest.raises(DataError, match=r"no column 'rewards'"):
        build(tok, tmp_path / "r", [{"prompt": "hi", "responses": ["a", "b"]}])
    mixed = [tmp_path / "m" / "a.jsonl", tmp_path / "m" / "b.jsonl"]
    write_jsonl(mixed[0], [{"prompt": "hi"}])
    write_jsonl(mixed[1], [{"prompt": "hi", "responses": ["a", "b"], "rewards": [1, 0]}])
    dm = GRPODataModule(tok, [str(p) for p in mixed], cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="mixes 1 offline rows .* and 1 prompt-only rows"):
        dm.setup("fit")
    with pytest.raises(DataError, match="data.max_prompt_len"):
        GRPODataModule(tok, "x.jsonl", max_prompt_len=0)


def test_bundled_corpus_rows_load(tok, tmp_path, tokenizer_dir):
    """The quickstart's GRPO files (prompt, answer, reference) load as online prompts."""
    from astrai.train.quickstart.corpus import write_corpus

    paths = write_corpus(tmp_path / "corpus", n_docs=10, n_val_docs=2)
    dm = GRPODataModule(
        tokenizer_dir,
        str(paths["grpo_train"]),
        val=str(paths["grpo_val"]),
        batch_size=4,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert set(batch["rows"][0]) == {"prompt", "answer", "reference"}
    assert all(isinstance(p, list) and p for p in batch["prompt_ids"])
