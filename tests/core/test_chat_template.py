"""Chat template constants, rendering and message validation."""

from __future__ import annotations

import random

import jinja2
import pytest

from astrai.core.chat_template import (
    BOS,
    DEFAULT_CHAT_TEMPLATE,
    EOS,
    IM_END,
    IM_START,
    PAD,
    SPECIAL_TOKENS,
    normalize_messages,
    render_chat_template,
)
from astrai.core.tokenizer_trainer import train_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "你好，世界"},
    {"role": "assistant", "content": "Hello! 很高兴见到你。"},
    {"role": "user", "content": "2+2?"},
]

EXPECTED = (
    "<|im_start|>system\nYou are helpful.<|im_end|>\n"
    "<|im_start|>user\n你好，世界<|im_end|>\n"
    "<|im_start|>assistant\nHello! 很高兴见到你。<|im_end|>\n"
    "<|im_start|>user\n2+2?<|im_end|>\n"
)


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(1)
    words = ["hello", "world", "你好", "世界", "模型", "学习", "assistant", "user", "system"]
    lines = [" ".join(rng.choice(words) for _ in range(10)) for _ in range(200)]
    return train_tokenizer(iter(lines), vocab_size=300, min_frequency=2, show_progress=False)


def test_special_token_names():
    assert (BOS, EOS, PAD, IM_START, IM_END) == ("<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>")
    assert SPECIAL_TOKENS == (BOS, EOS, PAD, IM_START, IM_END)


def test_render_matches_hand_written_chatml():
    assert render_chat_template(DEFAULT_CHAT_TEMPLATE, CONVERSATION) == EXPECTED


def test_generation_prompt_appended_only_when_asked():
    with_prompt = render_chat_template(DEFAULT_CHAT_TEMPLATE, CONVERSATION, add_generation_prompt=True)
    assert with_prompt == EXPECTED + "<|im_start|>assistant\n"


def test_list_content_is_joined_text():
    messages = [{"role": "user", "content": [{"type": "text", "text": "part one, "}, {"type": "text", "text": "二"}]}]
    assert render_chat_template(DEFAULT_CHAT_TEMPLATE, messages) == "<|im_start|>user\npart one, 二<|im_end|>\n"
    assert normalize_messages(messages)[0]["content"] == "part one, 二"


def test_normalize_keeps_other_keys_and_does_not_mutate():
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "bob"}]
    out = normalize_messages(messages)
    assert out == [{"role": "user", "content": "hi", "name": "bob"}]
    assert isinstance(messages[0]["content"], list)


@pytest.mark.parametrize(
    ("messages", "pattern"),
    [
        ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], r"messages\[1\]\['role'\] is 'robot'"),
        ([{"role": "user", "content": "a"}, {"role": "assistant"}], r"messages\[1\].*missing 'content'"),
        ([{"content": "a"}], r"messages\[0\] is missing 'role'"),
        ([{"role": "user", "content": None}], r"messages\[0\].*missing 'content'"),
        ([{"role": "user", "content": 5}], r"messages\[0\]\['content'\] must be a string"),
        ([{"role": "user", "content": [{"type": "image", "url": "x"}]}], r"messages\[0\]\['content'\]\[0\]"),
        ([{"role": "user", "content": [{"type": "text"}]}], r"messages\[0\]\['content'\]\[0\]\['text'\]"),
        (["hello"], r"messages\[0\] must be a dict"),
    ],
)
def test_bad_messages_name_index_and_field(messages, pattern):
    with pytest.raises(ValueError, match=pattern):
        render_chat_template(DEFAULT_CHAT_TEMPLATE, messages)


def test_single_dict_is_rejected():
    with pytest.raises(ValueError, match="list"):
        normalize_messages({"role": "user", "content": "x"})


def test_trim_and_lstrip_blocks_like_transformers():
    template = (
        "{% for m in messages %}\n"
        "  {% if m['role'] == 'user' %}\n"
        "U:{{ m['content'] }}\n"
        "  {% else %}\n"
        "A:{{ m['content'] }}\n"
        "  {% endif %}\n"
        "{% endfor %}"
    )
    # lstrip_blocks drops the indentation before block tags, trim_blocks the newline after them.
    out = render_chat_template(template, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    assert out == "U:a\nA:b\n"


def test_raise_exception_helper_and_variables():
    template = "{% if messages|length > 1 %}{{ raise_exception('only one message please') }}{% endif %}{{ bos_token }}"
    assert render_chat_template(template, [{"role": "user", "content": "x"}], bos_token=BOS) == BOS
    with pytest.raises(jinja2.TemplateError, match="only one message please"):
        render_chat_template(template, [{"role": "user", "content": "x"}] * 2)


def test_tojson_does_not_html_escape_and_generation_tag_is_accepted():
    template = "{{ tools | tojson }}{% generation %}[{{ messages[0]['content'] }}]{% endgeneration %}"
    out = render_chat_template(template, [{"role": "user", "content": "<b>"}], tools=[{"name": "a&b", "d": "中"}])
    assert out == '[{"name": "a&b", "d": "中"}][<b>]'


def test_sandbox_blocks_attribute_escape():
    template = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat_template(template, [{"role": "user", "content": "x"}])


def test_tokenized_template_uses_special_token_ids(tok):
    ids = tok.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    assert ids == tok.encode(EXPECTED + "<|im_start|>assistant\n")
    assert ids.count(tok.token_to_id(IM_START)) == 5
    assert ids.count(tok.token_to_id(IM_END)) == 4
    assert ids[0] == tok.token_to_id(IM_START)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


def test_apply_chat_template_text_and_kwargs(tok):
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == EXPECTED
    tok2 = type(tok)(tok.backend, chat_template="{{ bos_token }}{{ greeting }}{{ eos_token }}")
    assert tok2.apply_chat_template(CONVERSATION, tokenize=False, greeting="hey") == f"{BOS}hey{EOS}"


def test_validation_runs_through_tokenizer(tok):
    with pytest.raises(ValueError, match=r"messages\[0\]\['role'\]"):
        tok.apply_chat_template([{"role": "function", "content": "x"}])


TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
TOOL_CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "1+2?"},
    {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "add", "arguments": '{"a": 1}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "3"},
    {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "ok"}]},
]


def test_tools_calls_and_results_render_in_the_tool_call_convention():
    text = render_chat_template(DEFAULT_CHAT_TEMPLATE, TOOL_CHAT, add_generation_prompt=True, tools=TOOLS)
    system, rest = text.split("<|im_end|>\n", 1)
    assert system.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert (
        '\n<tools>\n{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}\n</tools>'
        in system
    )
    assert rest == (
        "<|im_start|>user\n1+2?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n3\n</tool_response>\n<tool_response>\nok\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_without_tools_a_conversation_renders_exactly_as_plain_chatml():
    assert render_chat_template(DEFAULT_CHAT_TEMPLATE, CONVERSATION, tools=None) == EXPECTED
    assert render_chat_template(DEFAULT_CHAT_TEMPLATE, CONVERSATION, tools=[]) == EXPECTED
