"""Malformed rows and the file formats: errors name the file, row and field; skip mode counts."""

from __future__ import annotations

import json

import pytest
from data_helpers import word_tokenizer, write_jsonl
from datasets import Dataset

from astrai.train.data import DataError, DPODataModule, PretrainDataModule, SFTDataModule

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


@pytest.fixture
def tok(tmp_path):
    return word_tokenizer(tmp_path / "tok")


def sft(tok, tmp_path, train, **kwargs) -> SFTDataModule:
    dm = SFTDataModule(tok, train, cache_dir=str(tmp_path / "cache"), **kwargs)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize(
    "bad,field,problem",
    [
        ({"messages": []}, "messages", "conversation is empty"),
        ({"messages": "hi"}, "messages", "must be a list"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "has no assistant message"),
        (
            {"messages": [{"role": "bot", "content": "hi"}]},
            r"messages\[0\]\.role",
            "must be one of system, user, assistant",
        ),
        (
            {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "yo"}]},
            r"messages\[0\]\.content",
            "must be a string, got int",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
            "messages",
            "every assistant message is empty",
        ),
        ({"messages": None}, "messages", "is missing"),
    ],
)
def test_bad_conversation_names_file_row_and_field(tok, tmp_path, bad, field, problem):
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataError, match=rf"chat\.jsonl, row 3: field '{field}': {problem}.*skip_bad_rows"):
        sft(tok, tmp_path, path)


def test_wrong_type_in_one_row_of_a_column(tok, tmp_path):
    # Arrow stores a column with mixed types as JSON; the row check still sees the int.
    path = write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "hi", "response": "yo"}, {"prompt": 7, "response": "yo"}])
    with pytest.raises(DataError, match=r"pr\.jsonl, row 2: field 'prompt': must be a string, got int"):
        sft(tok, tmp_path, path)


def test_missing_column_names_the_file_the_columns_and_the_fix(tok, tmp_path):
    path = write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "hi", "answer": "yo"}])
    with pytest.raises(
        DataError,
        match=r"pr\.jsonl: no column 'response' \(columns: prompt, answer\).*"
        r"data\.rename, e\.g\. \{old_name: response\}",
    ):
        sft(tok, tmp_path, path)
    dm = sft(tok, tmp_path, path, rename={"answer": "response"})
    assert len(dm.train_dataset) == 1
    dpo_path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "hi", "chosen": "yo"}])
    dm = DPODataModule(tok, dpo_path, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"pairs\.jsonl: no column 'rejected'"):
        dm.setup("fit")


def test_invalid_json_line_names_file_and_line(tok, tmp_path):
    path = tmp_path / "chat.jsonl"
    write_jsonl(path, [GOOD, GOOD])
    path.write_text(path.read_text() + '{"messages": [\n' + path.read_text())
    with pytest.raises(DataError, match=r"chat\.jsonl, line 3: invalid JSON.*skip_bad_rows"):
        sft(tok, tmp_path, str(path))
    dm = sft(tok, tmp_path, str(path), skip_bad_rows=True)
    assert len(dm.train_dataset) == 4 and dm.skipped == {"train": 1}


def test_skip_mode_drops_and_counts_exactly_the_bad_rows(tok, tmp_path, caplog):
    rows = [GOOD, {"messages": []}, {"prompt": "x"}, GOOD, {"messages": [{"role": "user", "content": "hi"}]}]
    rows[3] = {"messages": [{"role": "user", "content": "what"}, {"role": "assistant", "content": "two"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    dm = sft(tok, tmp_path, path, skip_bad_rows=True)
    assert dm.skipped == {"train": 3}
    kept = [dm.tokenizer.decode(dm.train_dataset[i]["input_ids"]) for i in range(len(dm.train_dataset))]
    assert len(kept) == 2 and "hi" in kept[0] and "two" in kept[1]  # order kept, nothing else lost
    assert "skipped 3 bad rows (first: row 2: field 'messages': conversation is empty)" in caplog.text


def test_skip_counts_survive_the_cache(tok, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD, {"messages": []}, GOOD])
    assert sft(tok, tmp_path, path, skip_bad_rows=True).skipped == {"train": 1}
    assert sft(tok, tmp_path, path, skip_bad_rows=True).skipped == {"train": 1}  # second run: from cache


def test_a_file_with_only_bad_rows_is_an_error_even_in_skip_mode(tok, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": []}])
    with pytest.raises(DataError, match=r"chat\.jsonl: no usable rows \(first problem: row 1"):
        sft(tok, tmp_path, path, skip_bad_rows=True)


def test_bad_row_in_the_second_file_names_that_file(tok, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [GOOD] * 3)
    b = write_jsonl(tmp_path / "b.jsonl", [GOOD, {"messages": []}])
    with pytest.raises(DataError, match=r"b\.jsonl, row 2"):
        sft(tok, tmp_path, [a, b])


def test_pretrain_text_of_wrong_type(tok, tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": "a b c"}, {"text": ["a"]}, {"text": "d e"}])
    dm = PretrainDataModule(tok, path, seq_len=2, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"docs\.jsonl, row 2: field 'text': must be a string, got list"):
        dm.setup("fit")


def test_parquet_arrow_json_directory_and_glob_sources(tok, tmp_path):
    rows = [{"prompt": f"what is {w}", "response": w} for w in ("one", "two", "a", "b")]
    (tmp_path / "src").mkdir()
    (tmp_path / "arr").mkdir()
    Dataset.from_list(rows).to_parquet(str(tmp_path / "src" / "p.parquet"))
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    arrow_file = next((tmp_path / "saved").glob("*.arrow"))
    (tmp_path / "arr" / "rows.arrow").write_bytes(arrow_file.read_bytes())
    (tmp_path / "src" / "j.json").write_text(json.dumps(rows))  # a JSON array
    write_jsonl(tmp_path / "src" / "l.jsonl", rows)
    expected = sft(tok, tmp_path, str(tmp_path / "src" / "l.jsonl"))
    first = [expected.train_dataset[i] for i in range(4)]
    for source in (
        str(tmp_path / "src" / "p.parquet"),
        str(tmp_path / "saved"),
        str(tmp_path / "arr" / "rows.arrow"),
        str(tmp_path / "src" / "j.json"),
    ):
        dm = sft(tok, tmp_path, source)
        assert [dm.train_dataset[i] for i in range(4)] == first, source
    assert len(sft(tok, tmp_path, str(tmp_path / "src")).train_dataset) == 12  # a directory: its three files
    assert len(sft(tok, tmp_path, str(tmp_path / "src" / "*.json*")).train_dataset) == 8  # a glob


def test_missing_file_and_unknown_dataset_name(tok, tmp_path):
    with pytest.raises(DataError, match=r"data\.train: no data file matches '.*nope\.jsonl'"):
        sft(tok, tmp_path, str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match=r"data\.val: cannot load dataset 'someone/no-such-set'.*org/name:split"):
        sft(tok, tmp_path, write_jsonl(tmp_path / "c.jsonl", [GOOD]), val="someone/no-such-set")


def test_val_fraction_is_a_seeded_disjoint_split(tok, tmp_path):
    rows = [{"prompt": f"what is {w}", "response": w} for w in ("one", "two", "a", "b", "c", "d", "e", "f", "g", "h")]
    path = write_jsonl(tmp_path / "pr.jsonl", rows)

    def split(seed):
        dm = sft(tok, tmp_path, path, val_fraction=0.2, seed=seed)
        key = lambda ds: sorted(tuple(ds[i]["input_ids"]) for i in range(len(ds)))  # noqa: E731
        return key(dm.train_dataset), key(dm.val_dataset)

    train, val = split(0)
    assert len(train) == 8 and len(val) == 2 and not set(train) & set(val)
    assert split(0) == (train, val)
    assert split(1) != (train, val)
    with pytest.raises(DataError, match=r"data\.val_fraction=0\.01 of 10 rows leaves an empty split"):
        sft(tok, tmp_path, path, val_fraction=0.01)


def test_no_validation_data_for_validate_is_explained(tok, tmp_path):
    dm = sft(tok, tmp_path, write_jsonl(tmp_path / "c.jsonl", [GOOD]))
    assert dm.val_dataloader() == []  # fit runs without validation
    with pytest.raises(DataError, match="no test data: set data.val"):
        dm.test_dataloader()
