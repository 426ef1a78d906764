"""Pre-training data: the token stream, windows with a stride, document attention, caching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_helpers import EOS, SP, VOCAB, word_tokenizer, write_jsonl

from astrai.train.data import DataError, PretrainDataModule
from astrai.train.data.pretrain import TokenWindows

A, B, C, D, E = (VOCAB[w] for w in "abcde")


@pytest.fixture
def tok(tmp_path):
    return word_tokenizer(tmp_path / "tok")


def make(tok, tmp_path, docs, **kwargs) -> PretrainDataModule:
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    kwargs.setdefault("cache_dir", str(tmp_path / "cache"))
    dm = PretrainDataModule(tok, path, **kwargs)
    dm.setup("fit")
    return dm


def test_windows_with_stride_match_hand_computation():
    # 10 tokens, windows of 4 (+1 for the labels), stride 3: starts 0, 3, then the last one
    # pulled back to end at the stream's end: min(6, 10 - 1 - 4) = 5.
    windows = TokenWindows(np.arange(10, dtype=np.uint16), seq_len=4, stride=3)
    got = [(w["input_ids"].tolist(), w["labels"].tolist()) for w in windows]
    assert got == [
        ([0, 1, 2, 3], [1, 2, 3, 4]),
        ([3, 4, 5, 6], [4, 5, 6, 7]),
        ([5, 6, 7, 8], [6, 7, 8, 9]),
    ]


@pytest.mark.parametrize(
    "n,seq_len,stride,starts",
    [
        (9, 4, 4, [0, 4]),  # exact fit: windows share only their boundary token
        (11, 4, 4, [0, 4, 6]),  # tail: the last window is pulled back
        (5, 4, 2, [0]),  # exactly one window
        (12, 3, 1, list(range(9))),  # every position
    ],
)
def test_window_starts_cover_the_stream(n, seq_len, stride, starts):
    windows = TokenWindows(np.arange(n, dtype=np.uint32), seq_len, stride)
    assert [int(w["input_ids"][0]) for w in windows] == starts
    assert len(windows) == len(starts)
    # Every token of the stream is some window's label, except the very first (nothing predicts it).
    seen = set().union(*(w["labels"].tolist() for w in windows))
    assert seen == set(range(1, n))


def test_stream_is_documents_joined_by_eos_and_batches_are_windows(tok, tmp_path):
    dm = make(tok, tmp_path, ["a b c", "", "d e"], seq_len=4, stride=3, batch_size=8)
    # "a b c" -> a SP b SP c; the empty document adds nothing, not even EOS.
    assert dm.train_dataset.tokens.tolist() == [A, SP, B, SP, C, EOS, D, SP, E, EOS]
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "labels"}
    got = sorted(zip(batch["input_ids"].tolist(), batch["labels"].tolist()))
    assert got == sorted(
        [
            ([A, SP, B, SP], [SP, B, SP, C]),
            ([SP, C, EOS, D], [C, EOS, D, SP]),
            ([EOS, D, SP, E], [D, SP, E, EOS]),
        ]
    )


def test_validation_windows_do_not_overlap_whatever_the_stride(tok, tmp_path):
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "a b c d e a b c d"}])  # 17 tokens + EOS
    dm = make(tok, tmp_path, ["a b c d e"] * 3, seq_len=4, stride=1, val=val)
    assert len(dm.train_dataset) == 30 - 4  # stride 1: every start
    assert [dm.val_dataset.start(i) for i in range(len(dm.val_dataset))] == [0, 4, 8, 12, 13]


def test_document_attention_restarts_positions_after_eos(tok, tmp_path):
    dm = make(tok, tmp_path, ["a b", "c", "d e"], seq_len=8, document_attention=True)
    # stream: a SP b EOS c EOS d SP e EOS (10 tokens): one window of 8 + 1, then the tail one.
    item = dm.train_dataset[0]
    assert item["input_ids"].tolist() == [A, SP, B, EOS, C, EOS, D, SP]
    assert item["position_ids"].tolist() == [0, 1, 2, 3, 0, 1, 0, 1]
    # EOS predicts nothing (the next document is unrelated); everything else predicts the next token.
    assert item["labels"].tolist() == [SP, B, EOS, -100, EOS, -100, SP, E]


def test_too_little_text_names_seq_len(tok, tmp_path):
    with pytest.raises(DataError, match=r"fewer than data.seq_len \+ 1 = 65.*lower data.seq_len"):
        make(tok, tmp_path, ["a b c"], seq_len=64)


def test_bad_options_name_the_field(tok, tmp_path):
    with pytest.raises(DataError, match="data.stride"):
        PretrainDataModule(tok, "x.jsonl", seq_len=8, stride=0)
    with pytest.raises(DataError, match="data.batch_size"):
        PretrainDataModule(tok, "x.jsonl", batch_size=0)


def test_missing_text_column_names_file_and_fix(tok, tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"body": "a b"}])
    dm = PretrainDataModule(tok, path, seq_len=2, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"docs\.jsonl: no column 'text' \(columns: body\).*data.rename"):
        dm.setup("fit")
    dm = PretrainDataModule(tok, path, seq_len=2, cache_dir=str(tmp_path / "cache"), text_field="body")
    dm.setup("fit")
    assert dm.train_dataset.tokens.tolist() == [A, SP, B, EOS]


def _files(root):
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock")}


def test_second_setup_reuses_the_tokenised_cache(tok, tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": f"a b c d e {i % 3}"} for i in range(50)])
    cache = tmp_path / "cache"
    first = PretrainDataModule(tok, path, seq_len=4, cache_dir=str(cache))
    first.setup("fit")
    before = _files(cache)
    assert any("astrai-tokens" in p.name for p in before)  # the token stream file
    assert any(p.name.startswith("cache-") for p in before)  # the tokenised rows (datasets.map)
    second = PretrainDataModule(tok, path, seq_len=4, cache_dir=str(cache))  # as in a new run
    second.setup("fit")
    assert _files(cache) == before  # nothing re-tokenised or re-written
    assert np.array_equal(first.train_dataset.tokens, second.train_dataset.tokens)


def test_changed_tokenizer_or_data_is_tokenised_again(tok, tmp_path):
    make(tok, tmp_path, ["a b"] * 5, seq_len=2)
    before = set(_files(tmp_path / "cache"))
    make(tok, tmp_path, ["a b c"] * 5, seq_len=2)  # same path, new content
    after_data = set(_files(tmp_path / "cache"))
    assert after_data > before
    other = word_tokenizer(tmp_path / "tok2")
    (tmp_path / "tok2" / "tokenizer_config.json").write_text(
        (tmp_path / "tok2" / "tokenizer_config.json").read_text().replace('"<|pad|>"', '"<|eos|>"')
    )
    make(other, tmp_path, ["a b c"] * 5, seq_len=2)
    assert set(_files(tmp_path / "cache")) > after_data


def test_num_proc_tokenises_in_worker_processes_with_the_same_result(tok, tmp_path):
    docs = [f"a b {'c ' * (i % 4)}d" for i in range(40)]
    single = make(tok, tmp_path / "one", docs, seq_len=4)
    multi = make(tok, tmp_path / "two", docs, seq_len=4, num_proc=2)
    assert np.array_equal(single.train_dataset.tokens, multi.train_dataset.tokens)


def test_batches_are_int64_and_labels_shifted(tok, tmp_path):
    dm = make(tok, tmp_path, ["a b c d e"] * 4, seq_len=6, batch_size=2)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (2, 6)
    stream = torch.as_tensor(dm.train_dataset.tokens.astype(np.int64))
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        start = next(s for s in range(len(stream)) if torch.equal(stream[s : s + 6], ids))
        assert torch.equal(labels, stream[start + 1 : start + 7])


def test_worker_processes_give_the_same_batches(tok, tmp_path):
    docs = [f"a b {'c ' * (i % 4)}d e" for i in range(30)]
    plain = make(tok, tmp_path, docs, seq_len=4, batch_size=4)
    workers = make(tok, tmp_path, docs, seq_len=4, batch_size=4, num_workers=2)
    got = [b["input_ids"].tolist() for b in workers.train_dataloader()]
    assert got == [b["input_ids"].tolist() for b in plain.train_dataloader()]
    assert len(got) == -(-len(plain.train_dataset) // 4)
