"""Every preference-row layout DPO reads, reduced to one form: prompt, chosen and rejected messages.

Preference data comes in the layouts people already have, and none of them should need a
conversion script:

- explicit prompt (TRL's *standard* and *conversational* formats, and ours): ``prompt`` is a
  string or a message list; ``chosen`` / ``rejected`` are replies (strings or message lists),
  or whole conversations that repeat the prompt;
- implicit prompt (TRL's implicit-prompt format, and upstream AstrAI's DPO rows): no
  ``prompt``; ``chosen`` and ``rejected`` are two whole conversations (message lists) or two
  whole texts (strings) that start the same way. The shared start is the prompt, the rest of
  each side is its reply.

Everything after this module (chat template, labels) sees only the one form, so a pair gives
the same token ids whichever layout it came in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .records import RecordError, prompt_messages, reply_messages, require_messages, require_text

Messages = list[dict[str, str]]
NO_PROMPT = "and the row has no 'prompt'"


def preference_pair(row: dict, system_prompt: str | None = None) -> tuple[Messages, Messages, Messages]:
    """(prompt, chosen reply, rejected reply) of one row, as message lists (see module doc)."""
    if row.get("prompt") is None:
        prompt, chosen, rejected = _implicit(row.get("chosen"), row.get("rejected"), system_prompt)
    else:
        prompt = prompt_messages(row["prompt"], "prompt", system_prompt)
        chosen = reply_messages(row.get("chosen"), "chosen", prompt)
        rejected = reply_messages(row.get("rejected"), "rejected", prompt)
    if chosen == rejected:
        raise RecordError("rejected", "is identical to 'chosen' (the pair teaches nothing)")
    return prompt, chosen, rejected


def shared_prefix_length(a: Sequence, b: Sequence) -> int:
    """How many leading items (characters, messages) ``a`` and ``b`` have in common."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def split_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen reply, rejected reply) of two texts that start the same way.

    The prompt ends at the last whitespace of the shared start, so no word is cut in two, and
    the whitespace goes to the replies ("The sky is blue." / "The sky is green." gives "The sky
    is", " blue.", " green.", TRL's explicit form of that pair). Text without whitespace in the
    shared start (Chinese, Japanese) is cut right after it.
    """
    shared = chosen[: shared_prefix_length(chosen, rejected)]
    last_space = max((i for i, c in enumerate(shared) if c.isspace()), default=None)
    prompt = shared if last_space is None else shared[:last_space].rstrip()
    return prompt, chosen[len(prompt) :], rejected[len(prompt) :]


def _implicit(chosen: Any, rejected: Any, system_prompt: str | None) -> tuple[Messages, Messages, Messages]:
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        if value is None:
            raise RecordError(field, "is missing")
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise RecordError(
            "rejected",
            f"is a {type(rejected).__name__} but 'chosen' is a {type(chosen).__name__} {NO_PROMPT}: an "
            "implicit-prompt pair is two whole texts or two whole conversations",
        )
    if isinstance(chosen, str):
        return _implicit_text(chosen, rejected, system_prompt)
    return _implicit_messages(require_messages(chosen, "chosen"), require_messages(rejected, "rejected"))


def _implicit_text(chosen: str, rejected: str, system_prompt: str | None) -> tuple[Messages, Messages, Messages]:
    chosen, rejected = require_text(chosen, "chosen"), require_text(rejected, "rejected")
    if chosen == rejected:
        raise RecordError("rejected", "is identical to 'chosen' (the pair teaches nothing)")
    prompt, chosen_reply, rejected_reply = split_text(chosen, rejected)
    if not prompt.strip():
        raise RecordError(
            "chosen",
            f"shares no leading text with 'rejected' {NO_PROMPT}, so there is no prompt to take from them; "
            "start both with the same prompt text, or give the prompt in a 'prompt' field",
        )
    replies = []
    for field, reply, other in (("chosen", chosen_reply, "rejected"), ("rejected", rejected_reply, "chosen")):
        if not reply.strip():
            raise RecordError(field, f"has nothing after the text it shares with '{other}' (no reply to compare)")
        replies.append([{"role": "assistant", "content": reply}])
    return prompt_messages(prompt, "prompt", system_prompt), replies[0], replies[1]


def _implicit_messages(chosen: Messages, rejected: Messages) -> tuple[Messages, Messages, Messages]:
    if chosen == rejected:
        raise RecordError("rejected", "is identical to 'chosen' (the pair teaches nothing)")
    n = shared_prefix_length(chosen, rejected)
    if n == 0:
        raise RecordError(
            "chosen",
            f"shares no leading message with 'rejected' {NO_PROMPT}, so there is no prompt to take from them; "
            "start both conversations with the same prompt turns, or give the prompt in a 'prompt' field",
        )
    _check_replies(chosen, rejected, n)
    return chosen[:n], chosen[n:], rejected[n:]


def _check_replies(chosen: Messages, rejected: Messages, n: int) -> None:
    """After ``n`` shared messages ending with a user (or system) turn, each side goes on with
    an assistant reply."""
    sides = (("chosen", chosen, "rejected"), ("rejected", rejected, "chosen"))
    for field, messages, other in sides:
        if len(messages) == n:
            raise RecordError(field, f"has nothing after the {n} messages it shares with '{other}' (no reply)")
    if chosen[n - 1]["role"] == "assistant":
        raise RecordError(
            "chosen",
            f"the {n} messages it shares with 'rejected' end with an assistant turn; the first message "
            "that differs must be the assistant's reply to a user turn",
        )
    for field, messages, other in sides:
        if messages[n]["role"] != "assistant":
            raise RecordError(
                f"{field}[{n}].role",
                f"is {messages[n]['role']!r} after the {n} messages shared with '{other}'; "
                "the first message that differs must be the assistant's reply",
            )
