"""Special-token names, the default ChatML chat template, and its renderer.

The renderer mirrors how ``transformers`` renders chat templates (sandboxed
jinja2, ``trim_blocks``/``lstrip_blocks``, ``raise_exception``), so a template
renders identically here and in a saved ``transformers`` tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import AstraiError

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"  # end of turn; generation stops on it too

# Order matters: trained tokenizers give these ids 0..4.
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD, IM_START, IM_END)

ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")

# List-valued content is handled in the template as well so that transformers,
# which passes messages through untouched, renders the same text as we do.
# Tools follow the convention of Qwen's and Hermes' templates (astrai.core.tool_calls reads it):
# the tools' signatures in the system turn inside <tools></tools>, each call the assistant makes
# as a <tool_call> JSON block, and results as <tool_response> blocks in a user turn (consecutive
# tool messages share one). Without tools the rendering is plain ChatML, as before tools existed.
DEFAULT_CHAT_TEMPLATE = (
    "{%- macro text(content) %}\n"
    "{%- if content is string %}\n"
    "{{- content }}\n"
    "{%- elif content %}\n"
    "{%- for part in content %}\n"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}\n"
    "{%- endfor %}\n"
    "{%- endif %}\n"
    "{%- endmacro %}\n"
    "{%- if tools %}\n"
    "{{- '<|im_start|>system\\n' }}\n"
    "{%- if messages and messages[0]['role'] == 'system' %}\n"
    "{{- text(messages[0]['content']) + '\\n\\n' }}\n"
    "{%- endif %}\n"
    "{{- '# Tools\\n\\nYou may call the functions below. Their signatures, one JSON object a line, "
    "are inside <tools></tools>:\\n<tools>' }}\n"
    "{%- for tool in tools %}\n"
    "{{- '\\n' + (tool | tojson) }}\n"
    "{%- endfor %}\n"
    "{{- '\\n</tools>\\n\\nTo call functions, reply with one <tool_call></tool_call> block a call, "
    "each holding a JSON object with the name and the arguments:\\n<tool_call>\\n"
    '{"name": <function name>, "arguments": <arguments object>}\\n</tool_call><|im_end|>\\n\' }}\n'
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}\n"
    "{{- raise_exception('unsupported role: ' + message['role']) }}\n"
    "{%- endif %}\n"
    "{%- if message['role'] == 'tool' %}\n"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}\n"
    "{{- '\\n<tool_response>\\n' + text(message['content']) + '\\n</tool_response>' }}\n"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}\n"
    "{%- elif not (tools and loop.first and message['role'] == 'system') %}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + text(message['content']) }}\n"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] %}\n"
    "{%- for call in message['tool_calls'] %}\n"
    "{%- set function = call['function'] if call['function'] is defined else call %}\n"
    "{%- if not loop.first or message['content'] %}{{- '\\n' }}{%- endif %}\n"
    "{{- '<tool_call>\\n{\"name\": ' + (function['name'] | tojson) + ', \"arguments\": ' }}\n"
    "{%- if function['arguments'] is string %}{{- function['arguments'] }}"
    "{%- else %}{{- function['arguments'] | tojson }}{%- endif %}\n"
    "{{- '}\\n</tool_call>' }}\n"
    "{%- endfor %}\n"
    "{%- endif %}\n"
    "{{- '<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)


def _content_to_text(content: Any, index: int) -> str:
    """Collapse string or ``[{"type": "text", "text": ...}]`` content to a string."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise AstraiError(
            f"messages[{index}]['content'] must be a string or a list of text parts, got {type(content).__name__}"
        )
    texts = []
    for j, part in enumerate(content):
        where = f"messages[{index}]['content'][{j}]"
        if not isinstance(part, Mapping) or part.get("type") != "text":
            raise AstraiError(f"{where} must be a dict with type 'text'")
        if not isinstance(part.get("text"), str):
            raise AstraiError(f"{where}['text'] must be a string")
        texts.append(part["text"])
    return "".join(texts)


def normalize_messages(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validate chat messages and return copies whose content is a plain string."""
    if isinstance(messages, (str, bytes, Mapping)):
        raise AstraiError("messages must be a list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise AstraiError(f"messages[{i}] must be a dict, got {type(message).__name__}")
        role = message.get("role")
        if role is None:
            raise AstraiError(f"messages[{i}] is missing 'role'")
        if role not in ROLES:
            raise AstraiError(f"messages[{i}]['role'] is {role!r}; expected one of {', '.join(ROLES)}")
        if message.get("content") is None:
            if role == "assistant" and message.get("tool_calls"):  # a reply that is only calls
                out.append({**message, "content": ""})
                continue
            raise AstraiError(f"messages[{i}] ({role}) is missing 'content'")
        out.append({**message, "content": _content_to_text(message["content"], i)})
    return out


class _GenerationTag(Extension):
    """Accept transformers' ``{% generation %}`` blocks by rendering their body as is.

    Our assistant mask is computed from offsets, so the markers carry no
    information we need; without this such templates would fail to parse.
    """

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson HTML-escapes, which would corrupt prompts.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile a template in a sandbox configured like transformers'."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, "jinja2.ext.loopcontrols"],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render_chat_template(
    template: str,
    messages: Iterable[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    **variables: Any,
) -> str:
    """Render ``messages`` with ``template``; extra keyword arguments become template variables
    (e.g. ``bos_token``, ``eos_token``, ``tools``)."""
    normalized = normalize_messages(messages)
    return compile_chat_template(template).render(
        messages=normalized, add_generation_prompt=add_generation_prompt, **variables
    )
