"""Helpers for the data tests: a word-level tokenizer whose ids are easy to compute by hand,
and JSONL writing. Imported by tests/train/test_data_*.py."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Split

from astrai.core.chat_template import DEFAULT_CHAT_TEMPLATE, SPECIAL_TOKENS
from astrai.core.tokenizer import AutoTokenizer

# ids 0..4: <|bos|> <|eos|> <|pad|> <|im_start|> <|im_end|>, then these in order.
BASE_WORDS = ["<unk>", "\n", " ", "system", "user", "assistant"]
WORDS = ["hi", "yo", "a", "b", "c", "d", "e", "f", "g", "h", "what", "is", "one", "two", "three", "good", "bad"]
VOCAB = {w: i for i, w in enumerate([*SPECIAL_TOKENS, *BASE_WORDS, *WORDS])}
BOS, EOS, PAD, IM_START, IM_END = range(5)
NL, SP, SYSTEM, USER, ASSISTANT = (VOCAB[w] for w in ("\n", " ", "system", "user", "assistant"))


def word_tokenizer(directory: Path) -> str:
    """Save a tokenizer with one id per word / whitespace character; return its directory."""
    backend = Tokenizer(WordLevel(VOCAB, unk_token="<unk>"))
    backend.pre_tokenizer = Split(Regex(r"\s"), behavior="isolated")
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    AutoTokenizer(backend, chat_template=DEFAULT_CHAT_TEMPLATE).save_pretrained(directory)
    return str(directory)


def ids(text: str) -> list[int]:
    """Hand tokenisation for this vocabulary: words split on spaces; '\\n' and ' ' are tokens."""
    out: list[int] = []
    for line_no, line in enumerate(text.split("\n")):
        if line_no:
            out.append(NL)
        for word_no, word in enumerate(line.split(" ")):
            if word_no:
                out.append(SP)
            if word:
                out.append(VOCAB[word])
    return out


def write_jsonl(path: Path, rows: list) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)
