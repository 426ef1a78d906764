"""``AutoTokenizer``: a thin wrapper over a ``tokenizers.Tokenizer`` that reads and writes the
Hugging Face layout (``tokenizer.json`` + ``tokenizer_config.json`` + ``chat_template.jinja``),
renders chat templates, builds SFT assistant masks and detokenises incrementally for streaming.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _BackendTokenizer

from astrai.core.chat_template import BOS, EOS, IM_END, PAD, normalize_messages, render_chat_template
from astrai.core.integrity import atomic_write, atomic_write_text, read_manifest, rewriting, verify_file

from .errors import AstraiError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"

# End-of-turn markers of common chat formats; whichever exists becomes a stop token.
END_OF_TURN_TOKENS: tuple[str, ...] = (IM_END, "<|eot_id|>", "<end_of_turn>", "<|end|>")

# transformers writes this sentinel (int(1e30)) when the length is unknown.
_UNKNOWN_MAX_LENGTH = 10**18

PathLike = str | os.PathLike[str]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AstraiError(f"{path}: malformed JSON ({e})") from e


def _token_content(value: Any, field: str, path: Path) -> str | None:
    """A special token as written by transformers: a string, a dict with "content", or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise AstraiError(f"{path}: field {field!r} must be a string or a dict with a 'content' string, got {value!r}")


def _config_template(config: Mapping[str, Any], path: Path) -> str | None:
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    # Older transformers versions store named templates as [{"name", "template"}].
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise AstraiError(f"{path}: field 'chat_template' must be a string or a list with a 'default' entry")


def _upstream_special_tokens(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """Upstream AstrAI keeps its special tokens in one "special_tokens" map of tokenizer_config.json
    ({"bos_token": ..., "eos_token": ..., "im_end": ...}); a top-level field still wins."""
    specials = config.get("special_tokens")
    return specials if isinstance(specials, Mapping) else {}  # other tools' lists of that name say nothing here


def _verify_files(root: Path) -> None:
    """In a model directory, the files read must match checksums.json (see astrai.core.integrity)."""
    manifest = read_manifest(root)
    for name in (TOKENIZER_FILE, CONFIG_FILE, TEMPLATE_FILE):
        if (root / name).is_file():
            verify_file(root, name, manifest)


class AutoTokenizer:
    """Tokenizer with special tokens and a chat template; see module docstring."""

    def __init__(
        self,
        tokenizer: _BackendTokenizer,
        *,
        bos_token: str | None = BOS,
        eos_token: str | None = EOS,
        pad_token: str | None = PAD,
        unk_token: str | None = None,
        chat_template: str | None = None,
        model_max_length: int | None = None,
    ) -> None:
        self._tok = tokenizer
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        self._special: dict[str, str | None] = {}
        for field, token in (
            ("bos_token", bos_token),
            ("eos_token", eos_token),
            ("pad_token", pad_token),
            ("unk_token", unk_token),
        ):
            if token is not None and tokenizer.token_to_id(token) is None:
                raise AstraiError(f"{field} {token!r} is not in the tokenizer vocabulary")
            self._special[field] = token
        added = tokenizer.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, t in added.items() if t.special)
        self._byte_level = self._decoder_type() == "ByteLevel"
        self._token_bytes: dict[int, bytes] = {}

    # ---- loading / saving ------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, directory: PathLike) -> AutoTokenizer:
        """Load ``tokenizer.json``, ``tokenizer_config.json`` and ``chat_template.jinja`` from a directory."""
        root = Path(directory)
        if not root.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {root}")
        tok_path = root / TOKENIZER_FILE
        if not tok_path.is_file():
            raise FileNotFoundError(f"{root} has no {TOKENIZER_FILE}")
        try:
            backend = _BackendTokenizer.from_file(str(tok_path))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise AstraiError(f"{tok_path}: cannot load tokenizer ({e})") from e

        cfg_path = root / CONFIG_FILE
        config = _read_json(cfg_path) if cfg_path.is_file() else {}
        if not isinstance(config, Mapping):
            raise AstraiError(f"{cfg_path}: expected a JSON object")

        tokens = {}
        upstream = _upstream_special_tokens(config)
        for field, default in (("bos_token", BOS), ("eos_token", EOS), ("pad_token", PAD), ("unk_token", None)):
            if field in config:
                tokens[field] = _token_content(config[field], field, cfg_path)
            elif field in upstream:
                tokens[field] = _token_content(upstream[field], f"special_tokens.{field}", cfg_path)
            else:
                # Directories without a config (or field) fall back to our names when they exist.
                tokens[field] = default if default and backend.token_to_id(default) is not None else None
            token = tokens[field]
            if token is not None and backend.token_to_id(token) is None:
                raise AstraiError(f"{cfg_path}: {field} {token!r} is not in the vocabulary of {tok_path}")
        if tokens["eos_token"] is None:
            raise AstraiError(f"{cfg_path}: no eos_token set (needed to stop generation)")

        template_path = root / TEMPLATE_FILE
        if template_path.is_file():
            template = template_path.read_text(encoding="utf-8")
        else:
            template = _config_template(config, cfg_path)

        max_len = config.get("model_max_length")
        if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len >= _UNKNOWN_MAX_LENGTH:
            max_len = None
        _verify_files(root)
        return cls(backend, chat_template=template, model_max_length=max_len, **tokens)

    def save_pretrained(self, directory: PathLike) -> Path:
        """Write a directory that both this class and ``transformers.AutoTokenizer`` can load."""
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        names = [TOKENIZER_FILE, CONFIG_FILE] + ([TEMPLATE_FILE] if self.chat_template is not None else [])
        with rewriting(root, names):  # keeps a model directory's checksums.json true
            self._write_files(root)
        return root

    def _write_files(self, root: Path) -> None:
        atomic_write(root / TOKENIZER_FILE, lambda tmp: self._tok.save(str(tmp)))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            # transformers would otherwise "clean up" spaces and break decode(encode(x)) == x.
            "clean_up_tokenization_spaces": False,
            **{k: v for k, v in self._special.items() if v is not None},
        }
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
            atomic_write_text(root / TEMPLATE_FILE, self.chat_template)
        atomic_write_text(root / CONFIG_FILE, json.dumps(config, ensure_ascii=False, indent=2) + "\n")

    # ---- vocabulary ------------------------------------------------------------------

    @property
    def backend(self) -> _BackendTokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of ids including added/special tokens (the embedding size a model needs)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def _id_of(self, field: str) -> int | None:
        token = self._special[field]
        return None if token is None else self._tok.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        return self._special["bos_token"]

    @property
    def eos_token(self) -> str | None:
        return self._special["eos_token"]

    @property
    def pad_token(self) -> str | None:
        return self._special["pad_token"]

    @property
    def unk_token(self) -> str | None:
        return self._special["unk_token"]

    @property
    def bos_token_id(self) -> int | None:
        return self._id_of("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._id_of("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._id_of("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._id_of("unk_token")

    @property
    def special_token_ids(self) -> frozenset[int]:
        return self._special_ids

    @property
    def stop_token_ids(self) -> list[int]:
        """EOS plus any known end-of-turn token present in the vocabulary, without duplicates."""
        ids = [self.eos_token_id] + [self._tok.token_to_id(t) for t in END_OF_TURN_TOKENS]
        return list(dict.fromkeys(i for i in ids if i is not None))

    # ---- encode / decode -------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` applies tokenizer.json's post-processor
        (for tokenizers trained here: a leading BOS)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        return self._tok.decode_batch([list(ids) for ids in batch], skip_special_tokens=skip_special_tokens)

    @property
    def is_byte_level(self) -> bool:
        """Whether decoding is GPT-2 style byte-level (enables exact byte-wise streaming)."""
        return self._byte_level

    def _decoder_type(self) -> str | None:
        decoder = json.loads(self._tok.to_str()).get("decoder") or {}
        return decoder.get("type")

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes a token contributes when decoded (byte-level tokenizers only)."""
        cached = self._token_bytes.get(token_id)
        if cached is None:
            piece = self._tok.id_to_token(token_id)
            if piece is None:
                raise AstraiError(f"token id {token_id} is out of range (vocab size {self.vocab_size})")
            cached = self._token_bytes[token_id] = _byte_level_piece_to_bytes(piece)
        return cached

    # ---- chat ------------------------------------------------------------------------

    def _render(self, messages: Iterable[Mapping[str, Any]], add_generation_prompt: bool, **kwargs: Any) -> str:
        if self.chat_template is None:
            raise AstraiError(
                f"this tokenizer has no chat template (add {TEMPLATE_FILE} or 'chat_template' in {CONFIG_FILE})"
            )
        variables = {**self._special, **kwargs}
        return render_chat_template(
            self.chat_template, messages, add_generation_prompt=add_generation_prompt, **variables
        )

    def apply_chat_template(
        self,
        messages: Iterable[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        **kwargs: Any,
    ) -> list[int] | str:
        """Render a conversation with the stored template; token ids unless ``tokenize=False``.
        Extra keyword arguments are passed to the template."""
        text = self._render(messages, add_generation_prompt, **kwargs)
        return self.encode(text) if tokenize else text

    def chat_assistant_mask(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> tuple[list[int], list[int]]:
        """Token ids of the rendered conversation and a 0/1 mask of assistant-reply tokens.

        A reply spans from the end of its generation prompt (so the role header is excluded)
        through the first end-of-turn/EOS token after its content. Spans are found in the
        rendered text and mapped to tokens through character offsets, so the template's
        layout is not assumed.
        """
        messages = normalize_messages(messages)
        text = self._render(messages, False, **kwargs)
        spans = self._assistant_spans(messages, text, **kwargs)
        encoding = self._tok.encode(text, add_special_tokens=False)
        # A token straddling a span edge (e.g. a merged "\n\n" after the header) counts as
        # assistant, as in transformers' own assistant masks.
        mask = [
            int(any(s < span_end and e > span_start for span_start, span_end in spans)) for s, e in encoding.offsets
        ]
        return encoding.ids, mask

    def _assistant_spans(self, messages: list[dict[str, Any]], text: str, **kwargs: Any) -> list[tuple[int, int]]:
        stop_strings = [self._tok.id_to_token(i) for i in self.stop_token_ids]
        spans: list[tuple[int, int]] = []
        # cursor walks through the text message by message, so a reply is never matched
        # inside an earlier turn that happens to contain the same words.
        cursor = 0
        for i, message in enumerate(messages):
            content = message["content"]
            if message["role"] != "assistant":
                # The first match at or after cursor is never past the real one, so this is
                # safe even when the template rewrites the content (then it is not found).
                if (at := text.find(content, cursor)) >= 0:
                    cursor = at + len(content)
                continue
            # Normally the reply starts right after the generation prompt (so any prefix the
            # template inserts, e.g. an empty think block, is trained on); templates whose
            # rendering of a prefix differs fall back to where the content itself starts.
            prompt = self._render(messages[:i], True, **kwargs)
            start = len(prompt) if text.startswith(prompt) and len(prompt) >= cursor else None
            content_at = text.find(content, cursor if start is None else start)
            if content_at < 0:
                raise AstraiError(f"messages[{i}]: assistant content not found in the rendered chat template")
            start = content_at if start is None else start
            content_end = content_at + len(content)
            turn = self._render(messages[: i + 1], False, **kwargs)
            turn_end = len(turn) if text.startswith(turn) and len(turn) >= content_end else len(text)
            ends = [p + len(s) for s in stop_strings if 0 <= (p := text.find(s, content_end, turn_end))]
            end = min(ends) if ends else content_end
            spans.append((start, end))
            cursor = end
        return spans


Tokenizer = AutoTokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level alphabet: printable bytes map to themselves, others to U+0100.."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


def _byte_level_piece_to_bytes(piece: str) -> bytes:
    # Same rule as tokenizers' ByteLevel decoder: a piece made only of alphabet characters
    # stands for those bytes; anything else (e.g. an added token with a space) is literal UTF-8.
    try:
        return bytes(_UNICODE_TO_BYTE[c] for c in piece)
    except KeyError:
        return piece.encode("utf-8")


class IncrementalDecoder:
    """Turn a stream of token ids into text, emitting only completed characters.

    ``push`` returns the text made final by the new token; a multibyte character split
    across tokens is held back until complete, so U+FFFD is never emitted early.
    ``flush`` returns whatever is still held at the end of the stream.
    """

    def __init__(self, tokenizer: AutoTokenizer, skip_special_tokens: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # Fallback state for non byte-level decoders: ids and window offsets.
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        if self._skip and token_id in self._tok.special_token_ids:
            return ""
        if self._tok.is_byte_level:
            return self._utf8.decode(self._tok.token_bytes(token_id))
        self._ids.append(token_id)
        return self._window_step(final=False)

    def flush(self) -> str:
        if self._tok.is_byte_level:
            return self._utf8.decode(b"", final=True)
        return self._window_step(final=True)

    def _window_step(self, final: bool) -> str:
        # Decoders such as Metaspace change a token's text depending on its neighbours, so
        # decode a short window and emit the suffix beyond what was already emitted.
        done = self._tok.decode(self._ids[self._prefix : self._read])
        full = self._tok.decode(self._ids[self._prefix :])
        if not final and (len(full) <= len(done) or full.endswith("\ufffd")):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return full[len(done) :]
