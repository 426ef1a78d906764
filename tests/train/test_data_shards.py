"""Upstream AstrAI token shards (``<domain>/shard_NNNN/{meta.json, <key>.bin}``) read by the
pre-training data module: exact windows, memory-mapped in place, errors naming file and field."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from data_helpers import word_tokenizer
from train_helpers import TINY_MODEL, make_trainer

from astrai.train.data import DataError, PretrainDataModule
from astrai.train.data.shards import ShardArray
from astrai.train.pretrain_module import PretrainModule

X = -100


def write_shard(directory, keys: dict[str, tuple[list, str]]):
    """One shard in upstream's layout: per key a raw ``<key>.bin`` (written through a numpy
    memmap) and its ``{"shape", "dtype"}`` in ``meta.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = {}
    for key, (values, dtype) in keys.items():
        out = np.memmap(directory / f"{key}.bin", dtype=dtype, mode="w+", shape=(len(values),))
        out[:] = values
        out.flush()
        del out
        meta[key] = {"shape": [len(values)], "dtype": dtype}
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


def documents(*docs, dtype="int32", positions=True, mask=None):
    """The keys of a shard holding ``docs`` (lists of token ids), as upstream's pipeline flattens them."""
    keys = {"sequence": ([t for d in docs for t in d], dtype)}
    if positions:
        keys["position_ids"] = ([p for d in docs for p in range(len(d))], "int32")
    if mask is not None:
        keys["loss_mask"] = (mask, "bool")
    return keys


@pytest.fixture
def tok(tmp_path):
    return word_tokenizer(tmp_path / "tok")


def make(tok, tmp_path, train, **kwargs) -> PretrainDataModule:
    train = [str(t) for t in train] if isinstance(train, list) else str(train)
    dm = PretrainDataModule(tok, train, cache_dir=str(tmp_path / "cache"), **kwargs)
    dm.setup("fit")
    return dm


def windows(dataset):
    return [{k: v.tolist() for k, v in dataset[i].items()} for i in range(len(dataset))]


@pytest.fixture
def corpus(tmp_path):
    """Two domains; the default one in two shards. Path order: __default__/0000, 0001, wiki/0000."""
    root = tmp_path / "out"
    write_shard(root / "__default__" / "shard_0000", documents([10, 11, 12], [13, 14]))
    write_shard(root / "__default__" / "shard_0001", documents([20, 21, 22, 23]))
    write_shard(root / "wiki" / "shard_0000", documents([30, 31], [32, 33, 34], dtype="uint16"))
    return root


STREAM = [10, 11, 12, 13, 14, 20, 21, 22, 23, 30, 31, 32, 33, 34]


def test_shards_in_path_order_form_one_stream_of_exact_windows(tok, tmp_path, corpus):
    dm = make(tok, tmp_path, corpus, seq_len=4, stride=4)
    assert dm.train_dataset.tokens[0 : len(STREAM)].tolist() == STREAM
    # 14 tokens, windows of 4 + 1 every 4: starts 0, 4, 8, then the tail pulled back to 14 - 5 = 9.
    assert windows(dm.train_dataset) == [
        {"input_ids": [10, 11, 12, 13], "labels": [11, 12, 13, 14]},
        {"input_ids": [14, 20, 21, 22], "labels": [20, 21, 22, 23]},  # crosses shards, as upstream's windows do
        {"input_ids": [23, 30, 31, 32], "labels": [30, 31, 32, 33]},
        {"input_ids": [30, 31, 32, 33], "labels": [31, 32, 33, 34]},
    ]
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "labels"} and batch["input_ids"].shape == (4, 4)


def test_document_attention_restarts_where_stored_positions_restart(tok, tmp_path, corpus):
    dm = make(tok, tmp_path, corpus, seq_len=6, stride=6, document_attention=True)
    first, second = windows(dm.train_dataset)[:2]
    # Documents [10 11 12] [13 14] | [20 21 22 23] | [30 31]: the last token of each predicts nothing.
    assert first == {
        "input_ids": [10, 11, 12, 13, 14, 20],
        "labels": [11, 12, X, 14, X, 21],
        "position_ids": [0, 1, 2, 0, 1, 0],
    }
    # A window starting inside a document (21 is its second token) counts positions from its own start.
    assert second == {
        "input_ids": [21, 22, 23, 30, 31, 32],
        "labels": [22, 23, X, 31, X, 33],
        "position_ids": [0, 1, 2, 0, 1, 0],
    }


def test_loss_mask_of_chat_shards_removes_untrained_targets(tok, tmp_path):
    root = write_shard(tmp_path / "sft", documents([10, 11, 12, 13, 14], mask=[0, 0, 1, 1, 0]))
    dm = make(tok, tmp_path, root, seq_len=4)
    assert windows(dm.train_dataset) == [{"input_ids": [10, 11, 12, 13], "labels": [X, 12, 13, X]}]


def test_tokens_are_memory_mapped_in_place_not_copied(tok, tmp_path, corpus):
    dm = make(tok, tmp_path, corpus, seq_len=4)
    tokens = dm.train_dataset.tokens
    assert isinstance(tokens, ShardArray)
    assert all(isinstance(s, np.memmap) and s.mode == "r" for s in tokens.segments)
    assert sorted(str(s.filename) for s in tokens.segments) == sorted(str(p) for p in corpus.rglob("sequence.bin"))
    assert np.shares_memory(tokens[0:3], tokens.segments[0])  # a slice inside one shard is a view of the mapping
    # Written to disk after loading: the module sees the new value, so it holds no copy.
    edit = np.memmap(corpus / "__default__" / "shard_0000" / "sequence.bin", dtype="int32", mode="r+")
    edit[1] = 99
    edit.flush()
    assert dm.train_dataset[0]["input_ids"].tolist() == [10, 99, 12, 13]


def test_pickled_dataset_carries_file_names_not_tokens(tok, tmp_path):
    root = write_shard(tmp_path / "big", documents(list(range(200_000)), positions=False))
    dm = make(tok, tmp_path, root, seq_len=64)
    data = pickle.dumps(dm.train_dataset)
    assert len(data) < 10_000  # the tokens are 800 kB
    again = pickle.loads(data)
    assert isinstance(again.tokens.segments[0], np.memmap)
    assert again[5]["input_ids"].tolist() == list(range(5 * 64, 6 * 64))


def test_validation_shards_and_text_rows_are_separate_choices(tok, tmp_path, corpus):
    val = write_shard(tmp_path / "val", documents([40, 41, 42, 43, 44, 45]))
    dm = make(tok, tmp_path, corpus, seq_len=4, stride=2, val=str(val))
    assert [w["input_ids"] for w in windows(dm.val_dataset)] == [[40, 41, 42, 43], [41, 42, 43, 44]]
    with pytest.raises(DataError, match=r"data\.val_fraction cannot hold out rows of token shards.*data\.val"):
        make(tok, tmp_path, corpus, seq_len=4, val_fraction=0.1)
    text = tmp_path / "docs.jsonl"
    text.write_text('{"text": "a b"}\n')
    with pytest.raises(DataError, match=r"data\.train: .*out holds token shards .* but .*docs\.jsonl does not"):
        make(tok, tmp_path, [str(corpus), str(text)], seq_len=4)


def shard_with(tmp_path, edit_meta=None, **keys):
    root = write_shard(tmp_path / "bad" / "shard_0000", keys or documents([1, 2, 3, 4, 5, 6]))
    if edit_meta:
        meta = json.loads((root / "meta.json").read_text())
        edit_meta(meta)
        (root / "meta.json").write_text(json.dumps(meta))
    return root


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda m: m["sequence"].pop("dtype"), r"meta\.json: field 'sequence\.dtype' is missing"),
        (lambda m: m["sequence"].pop("shape"), r"meta\.json: field 'sequence\.shape' is missing"),
        (
            lambda m: m.update(chosen=m.pop("sequence")),
            r"meta\.json: field 'sequence' is missing \(keys: position_ids, chosen\).*not for DPO/GRPO",
        ),
        (
            lambda m: m["sequence"].update(dtype="bfloat16"),
            r"meta\.json: field 'sequence\.dtype' is 'bfloat16', which cannot be read as sequence: use one of "
            r"uint8, .*int64",
        ),
        (lambda m: m["sequence"].update(dtype="float32"), r"field 'sequence\.dtype' is 'float32'"),
        (lambda m: m["sequence"].update(shape=[2, 3]), r"field 'sequence\.shape' must be \[length\]"),
        (
            lambda m: m["position_ids"].update(shape=[5]),
            r"position_ids\.bin: 24 bytes, but .*meta\.json field 'position_ids\.shape' = \[5\] of int32 needs 20",
        ),
    ],
)
def test_bad_meta_names_the_file_and_field(tok, tmp_path, edit, match):
    root = shard_with(tmp_path, edit)
    with pytest.raises(DataError, match=match):
        make(tok, tmp_path, root.parent, seq_len=2)


def test_a_bin_whose_size_disagrees_with_meta_names_file_and_field(tok, tmp_path):
    root = shard_with(tmp_path)
    with open(root / "sequence.bin", "ab") as f:
        f.write(b"\0\0")  # a torn write
    with pytest.raises(
        DataError,
        match=r"shard_0000/sequence\.bin: 26 bytes, but .*shard_0000/meta\.json field 'sequence\.shape' = \[6\] "
        r"of int32 needs 24; the file is truncated or belongs to other data",
    ):
        make(tok, tmp_path, root, seq_len=2)
    (root / "sequence.bin").unlink()
    with pytest.raises(DataError, match=r"sequence\.bin: missing, but .*meta\.json lists field 'sequence'"):
        make(tok, tmp_path, root, seq_len=2)


def test_keys_of_different_lengths_or_shards_preprocessed_differently_are_reported(tok, tmp_path):
    root = shard_with(tmp_path, sequence=([1, 2, 3, 4], "int32"), position_ids=([0, 1, 2], "int32"))
    with pytest.raises(DataError, match=r"field 'position_ids\.shape' is \[3\] but 'sequence\.shape' is \[4\]"):
        make(tok, tmp_path, root, seq_len=2)
    mixed = tmp_path / "mixed"
    write_shard(mixed / "shard_0000", documents([1, 2, 3]))
    write_shard(mixed / "shard_0001", documents([4, 5, 6], positions=False))
    with pytest.raises(
        DataError, match=r"shard_0001/meta\.json: field 'position_ids' is missing while .*shard_0000/meta\.json has it"
    ):
        make(tok, tmp_path, mixed, seq_len=2)


def test_lightning_fits_a_model_on_shards_with_document_attention(tmp_path, tokenizer_dir):
    rng = np.random.default_rng(0)
    docs = [rng.integers(5, 320, size=int(n)).tolist() for n in rng.integers(3, 40, size=40)]
    root = write_shard(tmp_path / "out" / "__default__" / "shard_0000", documents(*docs)).parent.parent
    dm = PretrainDataModule(tokenizer_dir, str(root), seq_len=16, batch_size=4, document_attention=True)
    module = PretrainModule(model=TINY_MODEL, tokenizer=tokenizer_dir, export={"on_fit_end": False})
    trainer = make_trainer(tmp_path, max_steps=3)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["train/loss"])
