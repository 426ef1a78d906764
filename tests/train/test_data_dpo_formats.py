"""DPO preference formats: TRL's standard, conversational and implicit-prompt rows and upstream
AstrAI's whole-conversation rows give the token ids of the equivalent explicit-prompt row."""

from __future__ import annotations

import pytest
from data_helpers import ASSISTANT, IM_END, IM_START, NL, SYSTEM, USER, VOCAB, ids, word_tokenizer, write_jsonl

from astrai.train.data import DataError, DPODataModule
from astrai.train.data.preference import preference_pair, split_text
from astrai.train.data.records import RecordError

GOOD_ = VOCAB["good"]


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


HISTORY = [system("a"), user("hi"), bot("yo"), user("what is one")]

# (format, row, the explicit-prompt row it means)
EQUIVALENT = [
    (
        "TRL standard",
        {"prompt": "what is one", "chosen": "good", "rejected": "bad a"},
        {"prompt": [user("what is one")], "chosen": [bot("good")], "rejected": [bot("bad a")]},
    ),
    (
        "TRL conversational",
        {"prompt": [user("what is one")], "chosen": [bot("good")], "rejected": [bot("bad a")]},
        {"prompt": "what is one", "chosen": "good", "rejected": "bad a"},
    ),
    (
        "TRL standard, implicit prompt",
        {"chosen": "what is one good", "rejected": "what is one bad a"},
        {"prompt": "what is one", "chosen": " good", "rejected": " bad a"},
    ),
    (
        "TRL standard, implicit prompt, cut inside a word",
        {"chosen": "what is one two", "rejected": "what is one three"},
        {"prompt": "what is one", "chosen": " two", "rejected": " three"},
    ),
    (
        "TRL conversational, implicit prompt",
        {"chosen": [user("what is one"), bot("good")], "rejected": [user("what is one"), bot("bad a")]},
        {"prompt": "what is one", "chosen": "good", "rejected": "bad a"},
    ),
    (
        "upstream AstrAI: system turn and history, multi-turn replies",
        {
            "chosen": [*HISTORY, bot("good"), user("b"), bot("c")],
            "rejected": [*HISTORY, bot("bad")],
        },
        {"prompt": HISTORY, "chosen": [bot("good"), user("b"), bot("c")], "rejected": "bad"},
    ),
]


@pytest.fixture
def tok(tmp_path):
    return word_tokenizer(tmp_path / "tok")


def rows_of(tok, directory, rows, **kwargs) -> list[dict]:
    path = write_jsonl(directory / "pairs.jsonl", rows)
    dm = DPODataModule(tok, path, cache_dir=str(directory / "cache"), **kwargs)
    dm.setup("fit")
    return [dm.train_dataset[i] for i in range(len(dm.train_dataset))]


@pytest.mark.parametrize("row,explicit", [(r, e) for _, r, e in EQUIVALENT], ids=[n for n, _, _ in EQUIVALENT])
def test_each_format_gives_the_token_ids_of_its_explicit_prompt_row(tok, tmp_path, row, explicit):
    assert rows_of(tok, tmp_path / "row", [row]) == rows_of(tok, tmp_path / "explicit", [explicit])


def test_shared_conversation_start_is_the_prompt_by_hand(tok, tmp_path):
    [row] = rows_of(
        tok, tmp_path, [{"chosen": [user("what is one"), bot("good")], "rejected": [user("what is one"), bot("bad")]}]
    )
    prompt = [IM_START, USER, NL, *ids("what is one"), IM_END, NL, IM_START, ASSISTANT, NL]
    assert row["chosen_input_ids"] == prompt + [GOOD_, IM_END, NL]
    assert [t for t in row["chosen_labels"] if t != -100] == [GOOD_, IM_END]
    assert [t for t in row["rejected_labels"] if t != -100] == [VOCAB["bad"], IM_END]


def test_system_prompt_goes_before_a_prompt_taken_from_two_texts(tok, tmp_path):
    [row] = rows_of(tok, tmp_path, [{"chosen": "hi good", "rejected": "hi bad"}], system_prompt="a")
    assert row["chosen_input_ids"][:9] == [IM_START, SYSTEM, NL, VOCAB["a"], IM_END, NL, IM_START, USER, NL]


def test_rows_with_and_without_prompt_mix_in_one_file(tok, tmp_path):
    mixed = rows_of(
        tok,
        tmp_path / "mixed",
        [
            {"prompt": "what is one", "chosen": [bot("good")], "rejected": [bot("bad a")]},
            {"prompt": None, "chosen": [user("hi"), bot("good")], "rejected": [user("hi"), bot("bad")]},
        ],
    )
    explicit = rows_of(
        tok,
        tmp_path / "explicit",
        [
            {"prompt": "what is one", "chosen": "good", "rejected": "bad a"},
            {"prompt": "hi", "chosen": "good", "rejected": "bad"},
        ],
    )
    assert mixed == explicit


@pytest.mark.parametrize(
    "text_chosen,text_rejected,split",
    [
        ("The sky is blue.", "The sky is green.", ("The sky is", " blue.", " green.")),
        ("Answer: blue", "Answer: black", ("Answer:", " blue", " black")),  # no word cut in two
        ("2+2 =\n4", "2+2 =\n5", ("2+2 =", "\n4", "\n5")),
        ("The sky is blue", "The sky is blue and green", ("The sky is", " blue", " blue and green")),
        ("天空是蓝色的", "天空是绿色的", ("天空是", "蓝色的", "绿色的")),  # no spaces: cut after the shared characters
    ],
)
def test_two_texts_split_at_the_last_shared_word(text_chosen, text_rejected, split):
    assert split_text(text_chosen, text_rejected) == split


@pytest.mark.parametrize(
    "row,match",
    [
        (
            {"chosen": [user("hi"), bot("good")], "rejected": [user("what is one"), bot("bad")]},
            r"field 'chosen': shares no leading message with 'rejected' and the row has no 'prompt'.*"
            r"give the prompt in a 'prompt' field",
        ),
        (
            {"chosen": "good hi", "rejected": "bad hi"},
            r"field 'chosen': shares no leading text with 'rejected' and the row has no 'prompt'",
        ),
        (
            {"chosen": [user("hi"), bot("good")], "rejected": [user("hi"), bot("good")]},
            r"field 'rejected': is identical to 'chosen'",
        ),
        ({"chosen": "hi good", "rejected": "hi good"}, r"field 'rejected': is identical to 'chosen'"),
        (
            {"chosen": [user("hi"), bot("good")], "rejected": [user("hi")]},
            r"field 'rejected': has no assistant message",
        ),
        (
            {"chosen": [user("hi"), bot("good")], "rejected": [user("hi"), bot("good"), user("b"), bot("c")]},
            r"field 'chosen': has nothing after the 2 messages it shares with 'rejected'",
        ),
        (
            {
                "chosen": [user("hi"), bot("a"), user("b"), bot("c")],
                "rejected": [user("hi"), bot("a"), user("d"), bot("c")],
            },
            r"field 'chosen': the 2 messages it shares with 'rejected' end with an assistant turn",
        ),
        (
            {"chosen": [user("hi"), bot("good")], "rejected": [user("hi"), user("b"), bot("c")]},
            r"field 'rejected\[1\]\.role': is 'user' after the 1 messages shared with 'chosen'",
        ),
        ({"chosen": None, "rejected": "hi bad"}, r"field 'chosen': is missing"),
    ],
)
def test_bad_implicit_prompt_rows_name_row_and_field(tok, tmp_path, row, match):
    good = {"chosen": [user("hi"), bot("good")], "rejected": [user("hi"), bot("bad")]}
    if isinstance(row["rejected"], str):  # one file holds one type per column
        good = {"chosen": "hi good", "rejected": "hi bad"}
    with pytest.raises(DataError, match=rf"pairs\.jsonl, row 2: {match}"):
        rows_of(tok, tmp_path, [good, row])


def test_a_pair_of_a_text_and_a_conversation_is_reported():
    # Arrow cannot hold a string and a list in one column, so this is checked on one row in Python.
    with pytest.raises(RecordError, match=r"field 'rejected': is a list but 'chosen' is a str"):
        preference_pair({"chosen": "hi good", "rejected": [user("hi"), bot("bad")]})


def test_without_prompt_column_the_columns_hint_names_chosen_and_rejected(tok, tmp_path):
    with pytest.raises(DataError, match=r"no column 'rejected'.*DPO rows need 'chosen' and 'rejected'"):
        rows_of(tok, tmp_path, [{"chosen": [user("hi"), bot("good")]}])
