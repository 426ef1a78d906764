"""Train a byte-level BPE tokenizer from text files, an iterable of texts or a ``datasets`` Dataset.

Byte-level BPE never needs an unknown token: every string is a sequence of bytes, so Chinese,
emoji and any other Unicode round-trip exactly. CLI: ``astrai-tokenizer train --help``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from astrai.core.chat_template import BOS, DEFAULT_CHAT_TEMPLATE, EOS, PAD, SPECIAL_TOKENS
from astrai.core.tokenizer import AutoTokenizer

from .errors import AstraiError

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".ndjson")
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

# Split before byte-level mapping. Like GPT-2's rule, but digits are split one by one (small
# models learn arithmetic better without arbitrary multi-digit tokens) and combining marks
# stay attached to their letter. Runs of Han characters stay together so BPE can learn words.
PRETOKENIZE_PATTERN = (
    r"'(?:[sdmt]|ll|ve|re)"
    r"| ?\p{L}[\p{L}\p{M}]*"
    r"|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)

TxtMode = Literal["line", "file"]
Source = str | os.PathLike[str] | Iterable[Any]


@dataclass
class _ReadStats:
    documents: int = 0
    characters: int = 0
    files: list[str] = field(default_factory=list)


def build_byte_level_bpe() -> Tokenizer:
    """An untrained byte-level BPE tokenizer with our pre-tokenizer and decoder."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise AstraiError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
            if not isinstance(record, Mapping) or text_field not in record:
                raise AstraiError(f"{path}:{lineno}: missing field {text_field!r}")
            text = record[text_field]
            if not isinstance(text, str):
                raise AstraiError(f"{path}:{lineno}: field {text_field!r} must be a string, got {type(text).__name__}")
            yield text


def _iter_txt(path: Path, txt_mode: TxtMode) -> Iterator[str]:
    # newline="" keeps "\r\n" as written: the tokenizer should see the real text.
    with path.open(encoding="utf-8", newline="") as f:
        if txt_mode == "file":
            yield f.read()
            return
        for line in f:
            line = line.rstrip("\r\n")
            if line:
                yield line


def iter_file_texts(
    path: str | os.PathLike[str], text_field: str = "text", txt_mode: TxtMode = "line"
) -> Iterator[str]:
    """Documents of one file: ``.jsonl`` lines' ``text_field``, otherwise plain text
    (one document per line, or the whole file with ``txt_mode="file"``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    if path.suffix.lower() in JSONL_SUFFIXES:
        return _iter_jsonl(path, text_field)
    return _iter_txt(path, txt_mode)


def _is_file_list(source: Any) -> bool:
    if isinstance(source, (str, os.PathLike)):
        return True
    return isinstance(source, Sequence) and bool(source) and all(isinstance(s, (str, os.PathLike)) for s in source)


def _iter_records(source: Iterable[Any], text_field: str) -> Iterator[str]:
    # A datasets.Dataset announces its columns; check before training starts.
    columns = getattr(source, "column_names", None)
    if isinstance(columns, list) and text_field not in columns:
        raise AstraiError(f"dataset has no column {text_field!r} (columns: {', '.join(columns)})")
    for i, item in enumerate(source):
        if isinstance(item, str):
            yield item
        elif isinstance(item, Mapping) and isinstance(item.get(text_field), str):
            yield item[text_field]
        else:
            raise AstraiError(f"item {i}: expected a string or a mapping with a string {text_field!r} field")


def _iter_source(source: Source, text_field: str, txt_mode: TxtMode, stats: _ReadStats) -> Iterator[str]:
    if _is_file_list(source):
        paths = [Path(source)] if isinstance(source, (str, os.PathLike)) else [Path(p) for p in source]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            hint = (
                ""
                if isinstance(source, (str, os.PathLike))
                else (" (a list of strings is read as file paths; pass iter(texts) to train on in-memory text)")
            )
            raise FileNotFoundError(f"input file not found: {', '.join(missing)}{hint}")
        stats.files = [str(p) for p in paths]
        texts: Iterable[str] = (t for p in paths for t in _logged(iter_file_texts(p, text_field, txt_mode), p))
    else:
        texts = _iter_records(source, text_field)
    for text in texts:
        stats.documents += 1
        stats.characters += len(text)
        yield text


def _logged(texts: Iterator[str], path: Path) -> Iterator[str]:
    log.info("reading %s", path)
    yield from texts


class _Capture:
    """Wrap an iterator so an exception it raises survives the trip through tokenizers' Rust trainer."""

    def __init__(self, it: Iterator[str]) -> None:
        self._it = it
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            yield from self._it
        except Exception as e:
            self.error = e


def train_tokenizer(
    files_or_iterable: Source,
    vocab_size: int = 32000,
    min_frequency: int = 2,
    out_dir: str | os.PathLike[str] | None = None,
    text_field: str = "text",
    *,
    txt_mode: TxtMode = "line",
    model_max_length: int | None = None,
    show_progress: bool = True,
) -> AutoTokenizer:
    """Train a byte-level BPE tokenizer; special tokens get ids 0..4 (BOS, EOS, PAD, IM_START, IM_END).

    ``files_or_iterable``: a path or a list of paths (``.jsonl`` read by ``text_field``, anything
    else as text), or any other iterable of strings / dicts (e.g. a ``datasets.Dataset``).
    Saves to ``out_dir`` when given.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise AstraiError(
            f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    stats = _ReadStats()
    texts = _iter_source(files_or_iterable, text_field, txt_mode, stats)
    first = next(texts, None)  # surfaces missing files and bad columns before training starts
    if first is None:
        raise AstraiError("no text found in the training input")
    captured = _Capture(_chain(first, texts))

    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    backend = build_byte_level_bpe()
    # A known length lets the progress bar show a percentage (files are streamed, so unknown).
    sized = not _is_file_list(files_or_iterable) and hasattr(files_or_iterable, "__len__")
    log.info("training byte-level BPE: vocab_size=%d, min_frequency=%d", vocab_size, min_frequency)
    backend.train_from_iterator(iter(captured), trainer=trainer, length=len(files_or_iterable) if sized else None)
    if captured.error is not None:
        raise captured.error
    source = ", ".join(stats.files) if stats.files else "an iterable"
    log.info("read %d documents (%d characters) from %s", stats.documents, stats.characters, source)

    # encode(..., add_special_tokens=True) then starts documents with BOS, here and in transformers.
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, bos_id)]
    )
    tokenizer = AutoTokenizer(
        backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=DEFAULT_CHAT_TEMPLATE,
        model_max_length=model_max_length,
    )
    log.info("trained byte-level BPE with %d tokens", tokenizer.vocab_size)
    if out_dir is not None:
        tokenizer.save_pretrained(out_dir)
        log.info("saved tokenizer to %s", out_dir)
    return tokenizer


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="astrai-tokenizer",
        description="Byte-level BPE tokenizer tools for AstrAI.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="train a byte-level BPE tokenizer from text files",
        description=(
            "Train a byte-level BPE tokenizer and save it in the Hugging Face layout "
            "(tokenizer.json, tokenizer_config.json, chat_template.jinja), loadable by "
            "astrai and by transformers.AutoTokenizer."
        ),
        epilog="example:\n  astrai-tokenizer train --input a.txt b.jsonl --vocab-size 8000 --out tok/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument(
        "--input",
        "-i",
        nargs="+",
        required=True,
        metavar="FILE",
        help=".jsonl files (one JSON object per line) or plain-text files",
    )
    train.add_argument("--out", "-o", required=True, metavar="DIR", help="output directory (created if missing)")
    train.add_argument(
        "--vocab-size", type=int, metavar="N", default=32000, help="target vocabulary size (default: %(default)s)"
    )
    train.add_argument(
        "--min-frequency",
        type=int,
        metavar="N",
        default=2,
        help="minimum pair frequency for a merge (default: %(default)s)",
    )
    train.add_argument(
        "--text-field",
        default="text",
        metavar="NAME",
        help="JSON field holding the text in .jsonl files (default: %(default)s)",
    )
    train.add_argument(
        "--txt-mode",
        choices=("line", "file"),
        default="line",
        help="plain text: one document per line, or the whole file as one (default: %(default)s)",
    )
    train.add_argument(
        "--model-max-length",
        type=int,
        metavar="N",
        default=None,
        help="context length recorded in tokenizer_config.json",
    )
    train.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        tok = train_tokenizer(
            args.input,
            vocab_size=args.vocab_size,
            min_frequency=args.min_frequency,
            out_dir=args.out,
            text_field=args.text_field,
            txt_mode=args.txt_mode,
            model_max_length=args.model_max_length,
            show_progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"astrai-tokenizer: error: {e}", file=sys.stderr)
        return 1
    print(f"saved tokenizer ({tok.vocab_size} tokens) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
