"""AutoTokenizer: round trips, incremental decoding, save/load, transformers parity, SFT masks."""

from __future__ import annotations

import json
import random
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from astrai.core.chat_template import BOS, EOS, IM_END, IM_START, PAD
from astrai.core.tokenizer import AutoTokenizer, IncrementalDecoder, Tokenizer
from astrai.core.tokenizer_trainer import train_tokenizer

EN = "the model learns small language tasks from clean data and answers every question with care".split()
ZH = ["我们", "喜欢", "学习", "语言", "模型", "训练", "数据", "中文", "你好", "世界", "今天", "天气", "很好"]

# Characters hypothesis should hit often: CJK, emoji (incl. ZWJ sequences), combining marks, odd whitespace.
TRICKY = st.sampled_from(list("中文字😀👍🏽‍❤️\u0301\u0308\u200b\u3000\u00a0\t\r\n \x00é") + ["👩‍👩‍👧", "\r\n", "  "])
TEXT = st.lists(st.one_of(st.characters(codec="utf-8"), TRICKY), max_size=30).map("".join)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def bilingual_corpus(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        en = " ".join(rng.choice(EN) for _ in range(rng.randint(4, 10)))
        zh = "".join(rng.choice(ZH) for _ in range(rng.randint(3, 8)))
        lines.append(f"{en.capitalize()}. {zh}。{rng.randint(0, 9999)}")
    return lines


@pytest.fixture(scope="module")
def tok() -> AutoTokenizer:
    return train_tokenizer(
        iter(bilingual_corpus()), vocab_size=400, min_frequency=2, model_max_length=256, show_progress=False
    )


@pytest.fixture(scope="module")
def saved_dir(tok, tmp_path_factory):
    return tok.save_pretrained(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def hf_tok(saved_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(saved_dir))


# ---- basics -------------------------------------------------------------------------


def test_alias_and_special_tokens(tok):
    assert Tokenizer is AutoTokenizer
    assert tok.is_byte_level
    assert [tok.id_to_token(i) for i in range(5)] == [BOS, EOS, PAD, IM_START, IM_END]
    assert (tok.bos_token, tok.bos_token_id) == (BOS, 0)
    assert (tok.eos_token, tok.eos_token_id) == (EOS, 1)
    assert (tok.pad_token, tok.pad_token_id) == (PAD, 2)
    assert tok.stop_token_ids == [1, 4]
    assert tok.special_token_ids == frozenset(range(5))
    assert tok.token_to_id("definitely-not-a-token") is None


def test_vocab_size_and_len(tok):
    assert tok.vocab_size == len(tok) == 400
    assert max(tok.get_vocab().values()) == tok.vocab_size - 1


def test_stop_token_ids_deduplicated_when_eos_is_end_of_turn(tok):
    other = AutoTokenizer(tok.backend, bos_token=None, eos_token=IM_END, pad_token=None)
    assert other.stop_token_ids == [4]
    assert other.bos_token_id is None and other.pad_token_id is None


def test_unknown_special_token_rejected(tok):
    with pytest.raises(ValueError, match="eos_token '<nope>' is not in the tokenizer vocabulary"):
        AutoTokenizer(tok.backend, eos_token="<nope>")


def test_chinese_is_compressed(tok):
    # Merges were learned for frequent Chinese words, so far fewer tokens than UTF-8 bytes.
    text = "我们喜欢学习语言模型"
    ids = tok.encode(text)
    assert len(ids) <= len(text) < len(text.encode("utf-8"))
    assert any(tok.decode([i]) in ZH for i in ids)


def test_add_special_tokens_prepends_bos(tok):
    assert tok.encode("hello", add_special_tokens=True) == [tok.bos_token_id, *tok.encode("hello")]


def test_special_token_text_maps_to_single_id(tok):
    assert tok.encode(f"{IM_START}user\nhi{IM_END}")[0] == 3
    assert tok.encode(f"a{IM_END}")[-1] == 4


def test_decode_skip_special_tokens(tok):
    ids = [tok.bos_token_id, *tok.encode("hi 你好"), tok.eos_token_id]
    assert tok.decode(ids) == f"{BOS}hi 你好{EOS}"
    assert tok.decode(ids, skip_special_tokens=True) == "hi 你好"


def test_batch_matches_single(tok):
    texts = ["hello world", "你好，世界", "", "mixed 中英 text 123"]
    batch = tok.encode_batch(texts)
    assert batch == [tok.encode(t) for t in texts]
    assert tok.decode_batch(batch) == texts


@FAST
@given(text=TEXT)
def test_encode_decode_roundtrip(tok, text):
    assert tok.decode(tok.encode(text)) == text


@FAST
@given(text=st.text(max_size=60))
def test_roundtrip_plain_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text


# ---- incremental decoding -------------------------------------------------------------


@FAST
@given(text=TEXT)
def test_incremental_decoder_matches_full_decode(tok, text):
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in tok.encode(text)]
    assert "".join(pieces) == text
    assert dec.flush() == ""
    assert not any("\ufffd" in p for p in pieces) or "\ufffd" in text


@FAST
@given(ids=st.lists(st.integers(0, 399), max_size=30))
def test_incremental_decoder_on_arbitrary_ids(tok, ids):
    # Arbitrary ids produce invalid UTF-8; replacement must match the full decode exactly.
    dec = IncrementalDecoder(tok)
    assert "".join(dec.push(i) for i in ids) + dec.flush() == tok.decode(ids)
    dec = IncrementalDecoder(tok, skip_special_tokens=True)
    assert "".join(dec.push(i) for i in ids) + dec.flush() == tok.decode(ids, skip_special_tokens=True)


def test_incremental_decoder_streams_merged_tokens(tok):
    text = bilingual_corpus(1, seed=5)[0] + " 😀"
    ids = tok.encode(text)
    assert len(ids) < len(text)  # merges (multi-character tokens) are in play
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) == text
    assert sum(len(p) > 1 for p in pieces) > 3


def test_incremental_decoder_holds_back_split_character(tok):
    ids = tok.encode("😀")  # 4 UTF-8 bytes, not merged in this vocab
    assert len(ids) > 1
    dec = IncrementalDecoder(tok)
    assert [dec.push(i) for i in ids] == [""] * (len(ids) - 1) + ["😀"]


def test_incremental_decoder_flush_emits_dangling_bytes(tok):
    ids = tok.encode("😀")[:2]
    dec = IncrementalDecoder(tok)
    assert "".join(dec.push(i) for i in ids) == ""
    assert dec.flush() == tok.decode(ids) == "\ufffd"


def test_incremental_decoder_fallback_for_metaspace_tokenizer():
    backend = BackendTokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.train_from_iterator(
        bilingual_corpus(100), trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", EOS], show_progress=False)
    )
    mtok = AutoTokenizer(backend, bos_token=None, eos_token=EOS, pad_token=None)
    assert not mtok.is_byte_level
    text = "the model 学习 data and 今天天气很好"
    ids = mtok.encode(text)
    dec = IncrementalDecoder(mtok)
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) + dec.flush() == mtok.decode(ids) == text
    assert sum(bool(p) for p in pieces) > 3  # it streams, not everything at the end


# ---- save / load ----------------------------------------------------------------------


def test_saved_layout(saved_dir):
    names = sorted(p.name for p in saved_dir.iterdir())
    assert names == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((saved_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (BOS, EOS, PAD)
    assert config["model_max_length"] == 256
    assert config["chat_template"] == (saved_dir / "chat_template.jinja").read_text()


def test_from_pretrained_roundtrip(tok, saved_dir):
    loaded = AutoTokenizer.from_pretrained(saved_dir)
    text = "Hello 世界 😀 123"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.chat_template == tok.chat_template
    assert loaded.model_max_length == 256
    assert loaded.stop_token_ids == tok.stop_token_ids
    assert loaded.encode(text, add_special_tokens=True)[0] == loaded.bos_token_id


@pytest.fixture
def copy_dir(saved_dir, tmp_path):
    dst = tmp_path / "tok"
    shutil.copytree(saved_dir, dst)
    return dst


def _edit_config(directory, **changes):
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_dict_special_tokens_and_hf_max_length_sentinel(copy_dir):
    _edit_config(copy_dir, eos_token={"content": IM_END, "special": True}, model_max_length=int(1e30))
    loaded = AutoTokenizer.from_pretrained(copy_dir)
    assert loaded.eos_token == IM_END and loaded.eos_token_id == 4
    assert loaded.model_max_length is None


def test_jinja_file_takes_precedence_over_config(copy_dir):
    (copy_dir / "chat_template.jinja").write_text("FILE")
    _edit_config(copy_dir, chat_template="CONFIG")
    assert AutoTokenizer.from_pretrained(copy_dir).chat_template == "FILE"
    (copy_dir / "chat_template.jinja").unlink()
    assert AutoTokenizer.from_pretrained(copy_dir).chat_template == "CONFIG"
    _edit_config(copy_dir, chat_template=[{"name": "default", "template": "LIST"}])
    assert AutoTokenizer.from_pretrained(copy_dir).chat_template == "LIST"


def test_missing_template_is_a_clear_error(copy_dir):
    (copy_dir / "chat_template.jinja").unlink()
    _edit_config(copy_dir, chat_template=None)
    loaded = AutoTokenizer.from_pretrained(copy_dir)
    with pytest.raises(ValueError, match="no chat template"):
        loaded.apply_chat_template([{"role": "user", "content": "x"}])


def test_config_is_optional_when_default_tokens_exist(copy_dir):
    (copy_dir / "tokenizer_config.json").unlink()
    loaded = AutoTokenizer.from_pretrained(copy_dir)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (0, 1, 2)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer directory not found: .*nowhere"):
        AutoTokenizer.from_pretrained(tmp_path / "nowhere")


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}.*has no tokenizer\.json"):
        AutoTokenizer.from_pretrained(tmp_path)


def test_malformed_tokenizer_json(copy_dir):
    (copy_dir / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer\.json: cannot load tokenizer"):
        AutoTokenizer.from_pretrained(copy_dir)


def test_malformed_config_json(copy_dir):
    (copy_dir / "tokenizer_config.json").write_text('{"eos_token": ')
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: malformed JSON"):
        AutoTokenizer.from_pretrained(copy_dir)


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"bos_token": 7}, r"tokenizer_config\.json: field 'bos_token' must be a string"),
        ({"pad_token": {"id": 2}}, r"field 'pad_token' must be a string or a dict"),
        ({"eos_token": "<|missing|>"}, r"eos_token '<\|missing\|>' is not in the vocabulary"),
        ({"eos_token": None}, r"no eos_token"),
        ({"chat_template": 3}, r"field 'chat_template'"),
    ],
)
def test_bad_config_fields_are_named(copy_dir, changes, pattern):
    if "chat_template" in changes:
        (copy_dir / "chat_template.jinja").unlink()
    _edit_config(copy_dir, **changes)
    with pytest.raises(ValueError, match=pattern):
        AutoTokenizer.from_pretrained(copy_dir)


# ---- transformers parity ----------------------------------------------------------------

CHAT = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "今天天气怎么样？"},
    {"role": "assistant", "content": "Today the weather is 很好 ☀️."},
    {"role": "user", "content": "Thanks!"},
]


@settings(max_examples=60, deadline=None)
@given(text=TEXT)
def test_transformers_same_ids(tok, hf_tok, text):
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf_tok(text)["input_ids"] == tok.encode(text, add_special_tokens=True)
    assert hf_tok.decode(tok.encode(text)) == text


def test_transformers_special_tokens(tok, hf_tok):
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == (BOS, EOS, PAD)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (0, 1, 2)
    assert len(hf_tok) == len(tok)
    assert hf_tok.model_max_length == 256


def test_transformers_decode_does_not_clean_up_spaces(tok, hf_tok):
    text = "Hello , world . It 's done ! ok ?"
    assert hf_tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_transformers_same_chat_rendering(tok, hf_tok, add_generation_prompt):
    ours = tok.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt, tokenize=False)
    theirs = hf_tok.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert ours == theirs
    ids = hf_tok.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ids == tok.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt)


def test_transformers_renders_list_content_like_us(tok, hf_tok):
    chat = [{"role": "user", "content": [{"type": "text", "text": "a "}, {"type": "text", "text": "中"}]}]
    assert hf_tok.apply_chat_template(chat, tokenize=False) == tok.apply_chat_template(chat, tokenize=False)


TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
TOOL_CHAT = [
    {"role": "user", "content": "1+2?"},
    {"role": "assistant", "content": "Adding.", "tool_calls": [{"function": {"name": "add", "arguments": {"a": 1}}}]},
    {"role": "tool", "content": "3"},
    {"role": "assistant", "content": "It is 3."},
]


def test_transformers_renders_tools_and_tool_turns_like_us(tok, hf_tok):
    ours = tok.apply_chat_template(TOOL_CHAT, tools=TOOLS, tokenize=False)
    assert hf_tok.apply_chat_template(TOOL_CHAT, tools=TOOLS, tokenize=False) == ours


def test_loads_directory_written_by_transformers(tok, hf_tok, tmp_path):
    hf_tok.save_pretrained(str(tmp_path))
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.encode("Hello 世界 😀") == tok.encode("Hello 世界 😀")
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.stop_token_ids) == (1, 2, [1, 4])
    assert loaded.apply_chat_template(CHAT, tokenize=False) == tok.apply_chat_template(CHAT, tokenize=False)


# ---- SFT assistant mask -----------------------------------------------------------------


def _masked_runs(tok, ids, mask):
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


def test_assistant_mask_hand_computed(tok):
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "Hi, 你好！"},
        {"role": "user", "content": "yes"},
        {"role": "assistant", "content": "yes"},  # same text as the user turn: must mask the reply only
    ]
    # Special tokens and newlines split the text, so the segments tokenise independently.
    segments = [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n", 0),
        ("Hi, 你好！", 1),
        (IM_END, 1),
        ("\n<|im_start|>user\nyes<|im_end|>\n<|im_start|>assistant\n", 0),
        ("yes", 1),
        (IM_END, 1),
        ("\n", 0),
    ]
    expected_ids, expected_mask = [], []
    for text, m in segments:
        seg = tok.encode(text)
        expected_ids += seg
        expected_mask += [m] * len(seg)
    ids, mask = tok.chat_assistant_mask(chat)
    assert ids == expected_ids == tok.apply_chat_template(chat)
    assert mask == expected_mask
    assert _masked_runs(tok, ids, mask) == ["Hi, 你好！<|im_end|>", "yes<|im_end|>"]


def test_assistant_mask_no_assistant_and_empty_reply(tok):
    ids, mask = tok.chat_assistant_mask([{"role": "user", "content": "hi"}])
    assert len(ids) == len(mask) and not any(mask)
    ids, mask = tok.chat_assistant_mask([{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}])
    assert _masked_runs(tok, ids, mask) == [IM_END]


@settings(max_examples=60, deadline=None)
@given(replies=st.lists(TEXT, min_size=1, max_size=3), question=TEXT)
def test_assistant_mask_property(tok, replies, question):
    chat = []
    for reply in replies:
        chat += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    ids, mask = tok.chat_assistant_mask(chat)
    assert ids == tok.apply_chat_template(chat) and len(mask) == len(ids)
    masked = tok.decode([i for i, m in zip(ids, mask) if m])
    assert masked == "".join(r + IM_END for r in replies)


def test_assistant_mask_with_a_different_template(tok):
    # Not ChatML: no role tokens, EOS ends assistant turns; the mask must still follow the text.
    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}### Q: {{ m['content'] }}\n"
        "{% else %}### A: <think></think>{{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}### A: {% endif %}"
    )
    other = AutoTokenizer(tok.backend, chat_template=template)
    chat = [
        {"role": "user", "content": "2+2"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3"},
        {"role": "assistant", "content": "六"},
    ]
    ids, mask = other.chat_assistant_mask(chat)
    # The template's "<think></think>" comes after the generation prompt, so it is trained on.
    assert _masked_runs(other, ids, mask) == [f"<think></think>4{EOS}", f"<think></think>六{EOS}"]


def test_assistant_mask_when_prefix_renders_differently(tok):
    # The last user turn is tagged, so rendering a prefix is not a prefix of the full text and
    # the mask must fall back to locating each reply after the turns before it.
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "{% if loop.last and m['role'] == 'user' %} [latest]{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    other = AutoTokenizer(tok.backend, chat_template=template)
    chat = [
        {"role": "user", "content": "yes"},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "yes"},
        {"role": "assistant", "content": "no"},
    ]
    ids, mask = other.chat_assistant_mask(chat)
    assert _masked_runs(other, ids, mask) == [f"yes{IM_END}", f"no{IM_END}"]
    # The first "yes" reply is the second occurrence of "yes" in the text, not the user's.
    text = other.apply_chat_template(chat, tokenize=False)
    first_masked = next(k for k, m in enumerate(mask) if m)
    assert other.decode(ids[:first_masked]) == text[: text.index("yes", text.index("yes") + 1)]


def test_assistant_mask_validates_messages(tok):
    with pytest.raises(ValueError, match=r"messages\[1\].*missing 'content'"):
        tok.chat_assistant_mask([{"role": "user", "content": "x"}, {"role": "assistant"}])


def test_assistant_mask_covers_the_calls_a_reply_makes_and_not_the_tool_results(tok):
    ids, mask = tok.chat_assistant_mask(TOOL_CHAT, tools=TOOLS)
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == (
        'Adding.\n<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call><|im_end|>It is 3.<|im_end|>'
    )
