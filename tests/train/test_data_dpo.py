"""DPO data: labels cover only the reply, both sides share one padded length, references pass through."""

from __future__ import annotations

import pytest
import torch
from data_helpers import ASSISTANT, IM_END, IM_START, NL, PAD, SP, SYSTEM, USER, VOCAB, ids, word_tokenizer, write_jsonl

from astrai.train.data import DataError, DPODataModule

X = -100
GOOD_, BAD_, HI, YO, A = (VOCAB[w] for w in ("good", "bad", "hi", "yo", "a"))


@pytest.fixture
def tok(tmp_path):
    return word_tokenizer(tmp_path / "tok")


def make(tok, tmp_path, rows, **kwargs) -> DPODataModule:
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    kwargs.setdefault("cache_dir", str(tmp_path / "cache"))
    dm = DPODataModule(tok, path, **kwargs)
    dm.setup("fit")
    return dm


def test_labels_mask_the_prompt_by_hand(tok, tmp_path):
    dm = make(tok, tmp_path, [{"prompt": "what is one", "chosen": "good", "rejected": "bad a"}])
    row = dm.train_dataset[0]
    prompt = [IM_START, USER, NL, *ids("what is one"), IM_END, NL, IM_START, ASSISTANT, NL]
    assert row["chosen_input_ids"] == prompt + [GOOD_, IM_END, NL]
    assert row["rejected_input_ids"] == prompt + [BAD_, SP, A, IM_END, NL]
    n = len(prompt)
    assert row["chosen_labels"] == [X] * (n - 1) + [GOOD_, IM_END, X, X]
    assert row["rejected_labels"] == [X] * (n - 1) + [BAD_, SP, A, IM_END, X, X]


def test_batch_pads_both_sides_to_one_length(tok, tmp_path):
    dm = make(
        tok,
        tmp_path,
        [
            {"prompt": "hi", "chosen": "good", "rejected": "bad a bad"},
            {"prompt": "what is one", "chosen": "good", "rejected": "bad"},
        ],
        batch_size=2,
    )
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {f"{s}_{k}" for s in ("chosen", "rejected") for k in ("input_ids", "labels", "attention_mask")}
    shapes = {tuple(v.shape) for v in batch.values()}
    assert len(shapes) == 1  # one (B, T) for every tensor
    for side in ("chosen", "rejected"):
        pad = batch[f"{side}_attention_mask"] == 0
        assert (batch[f"{side}_input_ids"][pad] == PAD).all() and (batch[f"{side}_labels"][pad] == X).all()
        # Every label is the next input token, and only reply tokens are labelled.
        ids_, labels = batch[f"{side}_input_ids"], batch[f"{side}_labels"]
        has = labels != X
        assert torch.equal(labels[:, :-1][has[:, :-1]], ids_[:, 1:][has[:, :-1]])
        assert not has[:, -1].any()


def test_message_lists_and_full_conversations(tok, tmp_path):
    turns = [
        {"role": "system", "content": "a"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "what is one"},
    ]
    full_chosen = turns + [{"role": "assistant", "content": "good"}]
    dm = make(
        tok, tmp_path, [{"prompt": turns, "chosen": full_chosen, "rejected": [{"role": "assistant", "content": "bad"}]}]
    )
    row = dm.train_dataset[0]
    labelled = [t for t in row["chosen_labels"] if t != X]
    assert labelled == [GOOD_, IM_END]  # the earlier assistant turn ("yo") is prompt, not trained
    assert [t for t in row["rejected_labels"] if t != X] == [BAD_, IM_END]
    assert row["chosen_input_ids"][:3] == [IM_START, SYSTEM, NL] and YO in row["chosen_input_ids"]


def test_system_prompt_goes_before_string_prompts(tok, tmp_path):
    dm = make(tok, tmp_path, [{"prompt": "hi", "chosen": "good", "rejected": "bad"}], system_prompt="a")
    assert dm.train_dataset[0]["chosen_input_ids"][:6] == [IM_START, SYSTEM, NL, A, IM_END, NL]


def test_precomputed_reference_logps_pass_through(tok, tmp_path):
    rows = [
        {"prompt": "hi", "chosen": "good", "rejected": "bad", "ref_chosen_logps": -1.5, "ref_rejected_logps": -2},
        {"prompt": "hi", "chosen": "yo", "rejected": "bad", "ref_chosen_logps": -0.25, "ref_rejected_logps": -3.0},
    ]
    dm = make(tok, tmp_path, rows, batch_size=2)
    batch = next(iter(torch.utils.data.DataLoader(dm.train_dataset, batch_size=2, collate_fn=dm.collate_fn())))
    assert batch["ref_chosen_logps"].tolist() == [-1.5, -0.25]
    assert batch["ref_rejected_logps"].tolist() == [-2.0, -3.0]
    assert batch["ref_chosen_logps"].dtype == torch.float32


def test_reference_logps_must_be_complete(tok, tmp_path):
    rows = [
        {"prompt": "hi", "chosen": "good", "rejected": "bad", "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0},
        {"prompt": "hi", "chosen": "yo", "rejected": "bad", "ref_chosen_logps": None, "ref_rejected_logps": -2.0},
    ]
    with pytest.raises(DataError, match=r"pairs\.jsonl, row 2: field 'ref_chosen_logps': is missing"):
        make(tok, tmp_path, rows)
    with pytest.raises(DataError, match=r"no column 'ref_rejected_logps'"):
        make(tok, tmp_path / "one", [{"prompt": "hi", "chosen": "good", "rejected": "bad", "ref_chosen_logps": -1.0}])


@pytest.mark.parametrize(
    "row,match",
    [
        ({"prompt": "hi", "chosen": "good", "rejected": "good"}, "field 'rejected': is identical to 'chosen'"),
        ({"prompt": "", "chosen": "good", "rejected": "bad"}, "field 'prompt': is empty"),
        (
            {"prompt": "hi", "chosen": 1, "rejected": "bad"},
            "field 'chosen': must be a string or a list of .* messages, got int",
        ),
        (
            {
                "prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                "chosen": "good",
                "rejected": "bad",
            },
            "field 'prompt': must end with a user",
        ),
        (
            {"prompt": "hi", "chosen": "good", "rejected": [{"role": "user", "content": "hi"}]},
            "field 'rejected': has no assistant message",
        ),
    ],
)
def test_malformed_pairs_name_row_and_field(tok, tmp_path, row, match):
    good = {"prompt": "hi", "chosen": "good", "rejected": "bad"}
    with pytest.raises(DataError, match=rf"pairs\.jsonl, row 2: {match}"):
        make(tok, tmp_path, [good, row])
    dm = make(tok, tmp_path / "skip", [good, row, good], skip_bad_rows=True)
    assert dm.skipped == {"train": 1} and len(dm.train_dataset) == 2


def test_a_prompt_longer_than_max_len_is_reported(tok, tmp_path):
    with pytest.raises(
        DataError,
        match=r"field 'prompt': has 13 tokens, leaving no room for a reply within "
        r"data\.max_len=12",
    ):
        make(tok, tmp_path, [{"prompt": "what is one", "chosen": "good", "rejected": "bad"}], max_len=12)
    dm = make(tok, tmp_path / "t", [{"prompt": "hi", "chosen": "good a b a b", "rejected": "bad"}], max_len=12)
    assert len(dm.train_dataset[0]["chosen_input_ids"]) == 12 and dm.truncated == {"train": 1}
