"""SFT data: the assistant-only mask, packing boundaries and padding, by hand and through a model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from data_helpers import ASSISTANT, IM_END, IM_START, NL, PAD, SP, SYSTEM, USER, VOCAB, ids, word_tokenizer, write_jsonl

from astrai.core.auto import AutoModel
from astrai.core.config import ModelConfig
from astrai.train.data import DataError, SFTDataModule
from astrai.train.data.sft import pack

X = -100
HI, YO, A, B, WHAT, IS, ONE, TWO = (VOCAB[w] for w in ("hi", "yo", "a", "b", "what", "is", "one", "two"))


@pytest.fixture
def tok(tmp_path):
    return word_tokenizer(tmp_path / "tok")


def make(tok, tmp_path, rows, **kwargs) -> SFTDataModule:
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    kwargs.setdefault("cache_dir", str(tmp_path / "cache"))
    dm = SFTDataModule(tok, path, **kwargs)
    dm.setup("fit")
    return dm


def chat(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def test_labels_cover_only_the_reply_and_its_end_of_turn(tok, tmp_path):
    dm = make(tok, tmp_path, [chat(("user", "hi"), ("assistant", "yo a"))])
    row = dm.train_dataset[0]
    # <|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo a<|im_end|>\n
    assert row["input_ids"] == [IM_START, USER, NL, HI, IM_END, NL, IM_START, ASSISTANT, NL, YO, SP, A, IM_END, NL]
    # labels[t] = the token after t, where that token is part of the reply (yo, ' ', a, <|im_end|>).
    assert row["labels"] == [X, X, X, X, X, X, X, X, YO, SP, A, IM_END, X, X]


def test_every_assistant_turn_is_trained_and_no_other(tok, tmp_path):
    dm = make(
        tok,
        tmp_path,
        [chat(("system", "b"), ("user", "hi"), ("assistant", "yo"), ("user", "what is one"), ("assistant", "two"))],
    )
    row = dm.train_dataset[0]
    expected_ids = [
        IM_START,
        SYSTEM,
        NL,
        B,
        IM_END,
        NL,
        IM_START,
        USER,
        NL,
        HI,
        IM_END,
        NL,
        IM_START,
        ASSISTANT,
        NL,
        YO,
        IM_END,
        NL,
    ] + [IM_START, USER, NL, *ids("what is one"), IM_END, NL, IM_START, ASSISTANT, NL, TWO, IM_END, NL]
    assert row["input_ids"] == expected_ids
    targets = {t: row["labels"][t] for t in range(len(expected_ids)) if row["labels"][t] != X}
    first_nl = expected_ids.index(ASSISTANT) + 1  # the '\n' after the first "assistant" header
    second_nl = len(expected_ids) - 4  # ... and after the second
    assert targets == {first_nl: YO, first_nl + 1: IM_END, second_nl: TWO, second_nl + 1: IM_END}


def test_prompt_response_rows_render_as_a_chat(tok, tmp_path):
    as_messages = make(tok, tmp_path / "m", [chat(("system", "b"), ("user", "what is one"), ("assistant", "two"))])
    as_columns = make(tok, tmp_path / "c", [{"prompt": "what is one", "response": "two"}], system_prompt="b")
    assert as_columns.train_dataset[0] == as_messages.train_dataset[0]


def test_pack_is_best_fit_decreasing_by_hand():
    # Longest first: 5 -> row0 (3 left); 4 -> new row1 (4 left); 3 -> row0, the fullest that fits
    # (0 left); 2 -> row1 (2 left).
    assert pack([5, 3, 4, 2], capacity=8) == [[0, 1], [2, 3]]
    assert pack([8, 1, 1], capacity=8) == [[0], [1, 2]]
    with pytest.raises(ValueError, match="more than the row capacity"):
        pack([9], capacity=8)


def test_packed_rows_restart_positions_and_labels_never_cross_samples(tok, tmp_path):
    rows = [
        chat(("user", "hi"), ("assistant", "yo")),  # 12 tokens
        chat(("user", "what is one"), ("assistant", "two")),  # 16 tokens
        chat(("user", "a"), ("assistant", "b a b")),
    ]  # 16 tokens
    padded = make(tok, tmp_path / "pad", rows, max_len=32)
    alone = [padded.train_dataset[i] for i in range(3)]
    assert [len(s["input_ids"]) for s in alone] == [12, 16, 16]
    packed = make(tok, tmp_path / "pack", rows, max_len=32, packing=True)
    # Best fit decreasing: 16 (row 0), 16 (row 0, full), 12 (row 1).
    assert packed.train_dataset.rows == [[1, 2], [0]]
    row = packed.train_dataset[0]
    assert row["input_ids"] == alone[1]["input_ids"] + alone[2]["input_ids"]
    assert row["labels"] == alone[1]["labels"] + alone[2]["labels"]
    assert row["position_ids"] == list(range(16)) + list(range(16))
    # The last label of each sample is empty: no target belongs to the next sample.
    assert row["labels"][15] == X and row["labels"][31] == X

    batch = next(iter(packed.train_dataloader()))
    for r in range(batch["input_ids"].shape[0]):
        ids_, labels, pos = batch["input_ids"][r], batch["labels"][r], batch["position_ids"][r]
        for t in torch.nonzero(labels != X).flatten().tolist():
            assert pos[t + 1] != 0, "a label points into the next sample"
            assert labels[t] == ids_[t + 1]


def test_padded_batches_mask_padding(tok, tmp_path):
    dm = make(
        tok,
        tmp_path,
        [chat(("user", "hi"), ("assistant", "yo")), chat(("user", "what is one"), ("assistant", "two"))],
        batch_size=2,
    )
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    lengths = batch["attention_mask"].sum(1).tolist()
    assert sorted(lengths) == [12, 16] and batch["input_ids"].shape == (2, 16)
    short = lengths.index(12)
    assert batch["input_ids"][short, 12:].tolist() == [PAD] * 4
    assert batch["labels"][short, 12:].tolist() == [X] * 4


def test_packed_loss_equals_one_sample_at_a_time(tok, tmp_path):
    """Through a real model: a packed row gives each sample exactly the logits it gets alone."""
    rows = [
        chat(("user", "hi"), ("assistant", "yo a b")),
        chat(("user", "what is one"), ("assistant", "two")),
        chat(("user", "b"), ("assistant", "a")),
        chat(("system", "a"), ("user", "hi"), ("assistant", "yo")),
    ]
    packed = make(tok, tmp_path / "pack", rows, max_len=40, packing=True, batch_size=4)
    padded = make(tok, tmp_path / "pad", rows, max_len=40, batch_size=4)
    cfg = ModelConfig(vocab_size=len(VOCAB), dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_len=64)
    model = AutoModel.from_config(cfg, dtype=torch.float64).eval()

    def nll_sum(dm):
        total, count = torch.zeros((), dtype=torch.float64), 0
        for batch in torch.utils.data.DataLoader(dm.train_dataset, batch_size=4, collate_fn=dm.collate_fn()):
            logits = model(
                batch["input_ids"], position_ids=batch.get("position_ids"), attention_mask=batch["attention_mask"]
            )
            total += F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")
            count += int((batch["labels"] != X).sum())
        return total, count

    with torch.no_grad():
        (packed_nll, packed_n), (padded_nll, padded_n) = nll_sum(packed), nll_sum(padded)
    assert len(packed.train_dataset) < len(padded.train_dataset)  # something was actually packed
    assert packed_n == padded_n == 6 + 2 + 2 + 2  # reply tokens + <|im_end|>: "yo a b" is yo,' ',a,' ',b
    torch.testing.assert_close(packed_nll, padded_nll, rtol=1e-10, atol=1e-10)


def test_overlong_samples_truncate_with_a_count_or_fail_by_name(tok, tmp_path):
    rows = [chat(("user", "hi"), ("assistant", "yo " * 10)), chat(("user", "hi"), ("assistant", "yo"))]
    dm = make(tok, tmp_path / "t", rows, max_len=14)
    assert dm.truncated == {"train": 1}
    assert [len(dm.train_dataset[i]["input_ids"]) for i in range(2)] == [14, 12]
    with pytest.raises(
        DataError,
        match=r"chat\.jsonl, row 1: field 'messages': has 31 tokens, more than "
        r"data\.max_len=14.*skip_bad_rows",
    ):
        make(tok, tmp_path / "e", rows, max_len=14, overlong="error")
    dm = make(tok, tmp_path / "s", rows, max_len=14, overlong="error", skip_bad_rows=True)
    assert dm.skipped == {"train": 1} and len(dm.train_dataset) == 1


def test_a_reply_cut_off_entirely_is_reported(tok, tmp_path):
    with pytest.raises(DataError, match="no reply tokens left to train on within data.max_len"):
        make(tok, tmp_path, [chat(("user", "what is one"), ("assistant", "two"))], max_len=8)


def test_options_are_checked_by_name(tok):
    with pytest.raises(DataError, match="data.overlong must be one of truncate, error"):
        SFTDataModule(tok, "x.jsonl", overlong="drop")
    with pytest.raises(DataError, match="data.max_len"):
        SFTDataModule(tok, "x.jsonl", max_len=1)


def test_tool_conversations_train_on_the_calls_and_not_on_the_tool_results(tmp_path):
    import json
    import random

    from astrai.core.tokenizer_trainer import train_tokenizer

    rng = random.Random(0)
    words = ["add", "sum", "is", "three", "tool_call", "name", "arguments", "<", ">", "{", "}", '"', ":", "1", "2"]
    bpe = train_tokenizer(
        iter(" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)), vocab_size=300, show_progress=False
    )
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    call = {"function": {"name": "add", "arguments": {"a": 1, "b": 2}}}
    messages = [
        {"role": "user", "content": "1+2?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "3"},
        {"role": "assistant", "content": "three"},
    ]
    rows = [{"messages": messages, "tools": json.dumps(tools)}, {"messages": messages, "tools": json.dumps(tools)}]
    dm = make(str(bpe.save_pretrained(tmp_path / "bpe")), tmp_path, rows)
    row = dm.train_dataset[0]
    trained = bpe.decode([t for t in row["labels"] if t != X])
    assert (
        trained == '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call><|im_end|>three<|im_end|>'
    )
    assert "# Tools" in bpe.decode(row["input_ids"])  # the row's tools are in the prompt


def test_a_tool_call_on_a_user_message_is_refused_by_name(tok, tmp_path):
    bad = {"messages": [{"role": "user", "content": "hi", "tool_calls": []}, {"role": "assistant", "content": "yo"}]}
    with pytest.raises(DataError, match=r"messages\[0\]\.tool_calls"):
        make(tok, tmp_path, [bad, chat(("user", "hi"), ("assistant", "yo"))])
