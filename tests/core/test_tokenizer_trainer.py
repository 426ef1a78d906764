"""Byte-level BPE training from files, iterables and datasets; the astrai-tokenizer CLI."""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from astrai.core.chat_template import SPECIAL_TOKENS
from astrai.core.tokenizer import AutoTokenizer
from astrai.core.tokenizer_trainer import iter_file_texts, main, train_tokenizer

EN = "a small model can learn to read and write both languages with enough clean text".split()
ZH = ["人工", "智能", "学习", "语言", "模型", "我们", "数据", "北京", "上海", "春天", "花开"]


def corpus(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(EN) for _ in range(rng.randint(3, 9))) + "，" + "".join(rng.choice(ZH) for _ in range(5))
        for _ in range(n)
    ]


@pytest.fixture
def txt_file(tmp_path: Path) -> Path:
    path = tmp_path / "a.txt"
    path.write_text("\n".join(corpus(200, seed=1)) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def jsonl_file(tmp_path: Path) -> Path:
    path = tmp_path / "b.jsonl"
    rows = [json.dumps({"text": t, "id": i}, ensure_ascii=False) for i, t in enumerate(corpus(200, seed=2))]
    path.write_text("\n".join(rows) + "\n\n", encoding="utf-8")
    return path


def test_special_tokens_first_and_vocab_size(txt_file, jsonl_file):
    tok = train_tokenizer([txt_file, jsonl_file], vocab_size=350, min_frequency=2, show_progress=False)
    assert [tok.id_to_token(i) for i in range(5)] == list(SPECIAL_TOKENS)
    assert tok.vocab_size == 350
    # The full byte alphabet is present even though the corpus uses few bytes.
    assert tok.decode(tok.encode("ÿ€𝄞")) == "ÿ€𝄞"


def test_learns_chinese_words(txt_file):
    tok = train_tokenizer(str(txt_file), vocab_size=400, min_frequency=2, show_progress=False)
    pieces = {tok.decode([i]) for i in range(tok.vocab_size)}
    assert {"学习", "模型", "北京"} <= pieces
    assert len(tok.encode("人工智能北京")) <= 3


def test_pretokenizer_splits_digits_and_words():
    tok = train_tokenizer(iter(["in 2024 we met, in 2024 we left. " * 20] * 20), vocab_size=300, show_progress=False)
    # Frequent as it is, "2024" stays four digit tokens; words still merge with their leading space.
    assert [tok.decode([i]) for i in tok.encode("2024")] == ["2", "0", "2", "4"]
    assert [tok.decode([i]) for i in tok.encode("in 2024 we left")] == ["in", " ", "2", "0", "2", "4", " we", " left"]


def test_iterable_of_dicts_and_records(tmp_path):
    rows = [{"content": t} for t in corpus(100)]
    tok = train_tokenizer(rows, vocab_size=300, text_field="content", show_progress=False)
    assert tok.vocab_size == 300
    with pytest.raises(ValueError, match=r"item 0: expected a string or a mapping with a string 'text'"):
        train_tokenizer(rows, vocab_size=300, show_progress=False)


def test_huggingface_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"body": corpus(100)})
    tok = train_tokenizer(ds, vocab_size=300, text_field="body", show_progress=False)
    assert tok.decode(tok.encode("语言模型")) == "语言模型"
    with pytest.raises(ValueError, match=r"dataset has no column 'text' \(columns: body\)"):
        train_tokenizer(ds, vocab_size=300, show_progress=False)


def test_txt_modes(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("line one\n\nline two\r\n", encoding="utf-8")
    assert list(iter_file_texts(path)) == ["line one", "line two"]
    assert list(iter_file_texts(path, txt_mode="file")) == ["line one\n\nline two\r\n"]


def test_out_dir_is_loadable_and_logs(txt_file, tmp_path, caplog):
    out = tmp_path / "nested" / "tok"
    with caplog.at_level(logging.INFO, logger="astrai.core.tokenizer_trainer"):
        tok = train_tokenizer([txt_file], vocab_size=320, out_dir=out, model_max_length=128, show_progress=False)
    assert "read 200 documents" in caplog.text and str(txt_file) in caplog.text
    loaded = AutoTokenizer.from_pretrained(out)
    assert loaded.encode("我们学习") == tok.encode("我们学习")
    assert loaded.model_max_length == 128
    assert loaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == (
        "<|im_start|>user\nhi<|im_end|>\n"
    )


def test_missing_file_is_named(txt_file, tmp_path):
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(FileNotFoundError, match=r"input file not found: .*missing\.jsonl"):
        train_tokenizer([txt_file, missing], vocab_size=300, show_progress=False)


def test_list_of_texts_hint():
    with pytest.raises(FileNotFoundError, match=r"pass iter\(texts\)"):
        train_tokenizer(["just some text", "more"], vocab_size=300, show_progress=False)


def test_jsonl_missing_field_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"txt": "typo"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path}:3: missing field 'text'"):
        train_tokenizer(path, vocab_size=300, show_progress=False)


def test_jsonl_invalid_json_and_wrong_type(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path}:2: invalid JSON"):
        train_tokenizer(path, vocab_size=300, show_progress=False)
    path.write_text('{"text": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path}:1: field 'text' must be a string"):
        train_tokenizer(path, vocab_size=300, show_progress=False)


def test_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size must be at least 261"):
        train_tokenizer(iter(["x"]), vocab_size=100)
    with pytest.raises(ValueError, match="no text found"):
        train_tokenizer(iter([]), vocab_size=300)


def test_main_in_process(txt_file, tmp_path, capsys):
    assert (
        main(["train", "--input", str(txt_file), "--vocab-size", "300", "--out", str(tmp_path / "t"), "--no-progress"])
        == 0
    )
    assert "saved tokenizer (300 tokens)" in capsys.readouterr().out
    assert main(["train", "--input", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "u")]) == 1
    assert "nope.txt" in capsys.readouterr().err


def _cli(*args: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("astrai-tokenizer")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "astrai.core.tokenizer_trainer"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=60)


def test_cli_trains_loadable_dir(txt_file, jsonl_file, tmp_path):
    out = tmp_path / "cli_tok"
    proc = _cli("train", "--input", str(txt_file), str(jsonl_file), "--vocab-size", "330", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "read 400 documents" in proc.stderr
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.vocab_size == 330
    assert tok.decode(tok.encode("春天花开 spring")) == "春天花开 spring"


def test_cli_help_and_errors(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "astrai.core.tokenizer_trainer", "train", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    for flag in ("--input", "--vocab-size", "--out", "--text-field", "--min-frequency"):
        assert flag in proc.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n', encoding="utf-8")
    proc = _cli("train", "--input", str(bad), "--out", str(tmp_path / "o"))
    assert proc.returncode == 1
    assert f"{bad}:1: missing field 'text'" in proc.stderr
    assert not (tmp_path / "o").exists()
