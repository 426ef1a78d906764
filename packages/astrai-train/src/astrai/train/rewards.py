"""Reward functions for GRPO: plain callables ``fn(prompt, completion, row) -> float``.

- ``prompt`` is the row's prompt as given (a string, or the message list when the row has one);
- ``completion`` is the generated reply as text (stop token not included);
- ``row`` is the whole dataset row, so a reward can read any column (``answer``, ``reference``...).

A run names its rewards in YAML by import path, each with a weight and keyword arguments:

    rewards:
      - {fn: astrai.train.rewards.answer_match, weight: 1.0}
      - {fn: astrai.train.rewards.format_match, weight: 0.2, kwargs: {pattern: '.+[.。]'}}
      - {fn: astrai.train.rewards.RewardModel, kwargs: {path: runs/judge/export}}

A class is instantiated once with ``kwargs``; a function gets them bound on every call. A
callable with a ``score_batch(prompts, completions, rows)`` method (like ``RewardModel``)
scores a whole rollout batch at once. The total reward is the weighted sum.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from astrai.core.errors import AstraiError

RewardFn = Callable[[Any, str, dict], float]


class RewardError(AstraiError):
    """A reward cannot be loaded or returned something unusable; the message names which and why."""


# ---- verifiable rewards ----------------------------------------------------------------------


def _row_value(row: dict, key: str, reward: str) -> str:
    if key not in row or row[key] is None:
        raise RewardError(
            f"{reward}: the dataset row has no {key!r} (columns: {sorted(row)}); "
            f"add the column or set kwargs: {{key: <column>}}"
        )
    return str(row[key]).strip()


def exact_match(prompt: Any, completion: str, row: dict, key: str = "reference") -> float:
    """1.0 when the completion equals ``row[key]`` exactly (surrounding whitespace ignored)."""
    return float(completion.strip() == _row_value(row, key, "exact_match"))


def similarity(prompt: Any, completion: str, row: dict, key: str = "reference") -> float:
    """How close the completion is to ``row[key]``, from 0 to 1: the share of characters the two
    have in common, in order (difflib's ratio). A dense signal where exact matches are rare: a
    reply that restates the question correctly but gets the result wrong still earns most of it."""
    return difflib.SequenceMatcher(None, completion.strip(), _row_value(row, key, "similarity")).ratio()


_ZH_DIGITS = {
    "零": 0,
    "〇": 0,
    "一": 1,
    "二": 2,
    "两": 2,
    "三": 3,
    "四": 4,
    "五": 5,
    "六": 6,
    "七": 7,
    "八": 8,
    "九": 9,
}
_ZH_UNITS = {"十": 10, "百": 100, "千": 1000}
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?|[零〇一二两三四五六七八九十百千]+")


def parse_number(text: str) -> float | None:
    """An Arabic (``-12``, ``3.5``) or Chinese (``七``, ``十二``, ``二十一``, ``一百零五``) numeral; None otherwise."""
    text = text.strip()
    if re.fullmatch(r"-?\d+(?:\.\d+)?", text):
        return float(text)
    if not text or any(c not in _ZH_DIGITS and c not in _ZH_UNITS for c in text):
        return None
    total, digit = 0, None
    for c in text:
        if c in _ZH_DIGITS:
            if digit is not None and _ZH_DIGITS[c] != 0:
                return None  # two digits in a row ("三四") is not one number
            digit = _ZH_DIGITS[c] or None
        else:  # a unit: 十 alone means 10
            total += (digit if digit is not None else 1) * _ZH_UNITS[c]
            digit = None
    return float(total + (digit or 0))


def final_number(text: str) -> float | None:
    """The last numeral written in ``text`` (Arabic or Chinese), e.g. the 7 of '3 + 4 = 7.'."""
    for match in reversed(_NUMBER.findall(text)):
        value = parse_number(match)
        if value is not None:
            return value
    return None


def answer_match(prompt: Any, completion: str, row: dict, key: str = "answer") -> float:
    """1.0 when the completion's final answer is ``row[key]``.

    A numeric answer (``7``, ``七``, ``-2.5``) is compared with the last numeral of the completion,
    so '3 + 4 = 7.' and '三加四等于七。' both match 7. Any other answer must appear in the
    completion as a whole word (for Chinese, as a substring), case-insensitively.
    """
    answer = _row_value(row, key, "answer_match")
    number = parse_number(answer)
    if number is not None:
        found = final_number(completion)
        return float(found is not None and math.isclose(found, number, rel_tol=0, abs_tol=1e-9))
    pattern = re.escape(answer.lower())
    if answer.isascii():
        pattern = rf"(?<!\w){pattern}(?!\w)"
    return float(re.search(pattern, completion.lower()) is not None)


def numbers_in(text: str) -> list[float]:
    """Every numeral of ``text`` (Arabic or Chinese), in order."""
    return [v for v in map(parse_number, _NUMBER.findall(text)) if v is not None]


def restates_question(prompt: Any, completion: str, row: dict) -> float:
    """For arithmetic-style replies that restate the problem before the result ('3 + 4 = 7.'):
    the share of the prompt's numbers that the completion repeats, in order, before its final
    number. Rewards reading the question right, whatever the result."""
    text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    asked = numbers_in(text)
    said = numbers_in(completion)[:-1]
    if not asked:
        return 0.0
    return sum(a == b for a, b in zip(asked, said)) / max(len(asked), len(said))


def format_match(prompt: Any, completion: str, row: dict, pattern: str = r"\S.*[.!?。！？]") -> float:
    """1.0 when the whole completion (stripped) matches the regular expression ``pattern``
    (default: one non-empty sentence ending with a full stop, in English or Chinese)."""
    return float(re.fullmatch(pattern, completion.strip(), flags=re.DOTALL) is not None)


# ---- a model as the reward -------------------------------------------------------------------

JUDGE_TEMPLATE = "Question: {prompt}\nAnswer: {completion}\nIs the answer correct? Reply yes or no."


class RewardModel:
    """A language model as judge: the reward is P(yes) / (P(yes) + P(no)) for its next token
    after a chat prompt built from ``template`` (fields: ``prompt``, ``completion`` and the row's
    columns), so it lies in [0, 1]. Any model directory works (ours or Hugging Face
    Llama/Qwen), e.g. one fine-tuned with SFT to answer 'yes'/'no'.

    Args:
        path: model directory (with its tokenizer).
        template: the judge's user message.
        yes, no: the answer words; their first token is scored.
        batch_size: completions scored per forward pass.
        device, dtype: where and how the judge runs (default: CUDA if available, float32 / bfloat16 on CUDA).
    """

    def __init__(
        self,
        path: str,
        template: str = JUDGE_TEMPLATE,
        yes: str = "yes",
        no: str = "no",
        batch_size: int = 16,
        device: str | None = None,
        dtype: str | None = None,
    ):
        from astrai.core.auto import AutoModel
        from astrai.core.tokenizer import AutoTokenizer

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = (
            getattr(torch, dtype) if dtype else (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        )
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path, dtype=torch_dtype, device=self.device).eval()
        except (FileNotFoundError, ValueError) as e:
            raise RewardError(f"RewardModel(path={path!r}): {e}") from None
        self.template, self.batch_size = template, batch_size
        self.yes_id, self.no_id = (self._first_token(w, name) for w, name in ((yes, "yes"), (no, "no")))
        if self.yes_id == self.no_id:
            raise RewardError(f"RewardModel: yes={yes!r} and no={no!r} start with the same token; pick other words")

    def _first_token(self, word: str, name: str) -> int:
        ids = self.tokenizer.encode(word)
        if not ids:
            raise RewardError(f"RewardModel: {name}={word!r} encodes to no token")
        return ids[0]

    def _prompt_ids(self, prompt: Any, completion: str, row: dict) -> list[int]:
        text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
        try:
            message = self.template.format(**{**row, "prompt": text, "completion": completion})
        except KeyError as e:
            raise RewardError(
                f"RewardModel.template names {e} which is neither prompt, completion nor a "
                f"column of the row ({sorted(row)})"
            ) from None
        return self.tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True)

    @torch.no_grad()
    def score_batch(self, prompts: Sequence[Any], completions: Sequence[str], rows: Sequence[dict]) -> list[float]:
        ids = [self._prompt_ids(p, c, r) for p, c, r in zip(prompts, completions, rows)]
        limit = self.model.config.max_len
        ids = [x[-limit:] for x in ids]  # keep the end: the question to the judge is there
        scores: list[float] = []
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start : start + self.batch_size]
            length = max(map(len, chunk))
            batch = torch.zeros(len(chunk), length, dtype=torch.long)
            mask = torch.zeros_like(batch)
            for i, x in enumerate(chunk):
                batch[i, : len(x)] = torch.tensor(x)
                mask[i, : len(x)] = 1
            batch, mask = batch.to(self.device), mask.to(self.device)
            last = (mask.sum(1) - 1) + torch.arange(len(chunk), device=self.device) * length
            logits = self.model(batch, attention_mask=mask, logits_index=last).float()
            pair = logits[:, [self.yes_id, self.no_id]].softmax(-1)
            scores += pair[:, 0].tolist()
        return scores

    def __call__(self, prompt: Any, completion: str, row: dict) -> float:
        return self.score_batch([prompt], [completion], [row])[0]


# ---- loading rewards named in a config ----------------------------------------------------------


@dataclass
class RewardSpec:
    """One reward of a run: ``fn`` is an import path (``package.module.name``) of a function or a
    class; ``weight`` multiplies it in the total; ``kwargs`` go to the function on every call, or
    to the class once; ``name`` is what it is logged as (default: the last part of ``fn``)."""

    fn: str
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    name: str | None = None


def import_object(path: str, where: str) -> Any:
    module_name, _, attr = path.rpartition(".") if isinstance(path, str) else ("", "", "")
    if not module_name or not attr:
        raise RewardError(
            f"{where}: {path!r} is not an import path; write it as package.module.name, "
            "e.g. astrai.train.rewards.answer_match"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardError(f"{where}: cannot import module {module_name!r} ({e})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise RewardError(f"{where}: module {module_name!r} has no {attr!r}") from None


class Reward:
    """One loaded reward: scores whole batches, checks every value is a finite number."""

    def __init__(self, spec: RewardSpec, where: str):
        if not isinstance(spec.weight, (int, float)) or not math.isfinite(spec.weight):
            raise RewardError(f"{where}.weight must be a finite number, got {spec.weight!r}")
        target = import_object(spec.fn, f"{where}.fn")
        if not callable(target):
            raise RewardError(f"{where}.fn: {spec.fn} is not callable")
        kwargs = dict(spec.kwargs or {})
        if inspect.isclass(target):
            try:
                target = target(**kwargs)
            except TypeError as e:
                raise RewardError(f"{where}.kwargs: {spec.fn}({', '.join(kwargs)}): {e}") from None
        elif kwargs:
            try:
                inspect.signature(target).bind("prompt", "completion", {}, **kwargs)
            except TypeError as e:
                raise RewardError(f"{where}.kwargs do not fit {spec.fn}: {e}") from None
            target = functools.partial(target, **kwargs)
        self.fn, self.weight, self.where = target, float(spec.weight), where
        self.name = spec.name or spec.fn.rpartition(".")[2]

    def score(self, prompts: Sequence[Any], completions: Sequence[str], rows: Sequence[dict]) -> list[float]:
        batched = getattr(self.fn, "score_batch", None)
        if batched is not None:
            values = list(batched(prompts, completions, rows))
        else:
            values = [self.fn(p, c, r) for p, c, r in zip(prompts, completions, rows)]
        if len(values) != len(completions):
            raise RewardError(
                f"{self.where} ({self.name}) returned {len(values)} scores for {len(completions)} completions"
            )
        out = []
        for v in values:
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = v.item()
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise RewardError(f"{self.where} ({self.name}) returned {v!r}; a reward must be a finite number")
            out.append(float(v))
        return out


def load_rewards(specs: Sequence[RewardSpec | dict] | None, field_name: str = "model.rewards") -> list[Reward]:
    """Load every reward named in a config; errors name the entry (``model.rewards[1].fn``) and the fix."""
    rewards = []
    for i, spec in enumerate(specs or []):
        where = f"{field_name}[{i}]"
        if isinstance(spec, dict):
            unknown = set(spec) - {"fn", "weight", "kwargs", "name"}
            if unknown or "fn" not in spec:
                raise RewardError(f"{where}: expected keys fn (required), weight, kwargs, name; got {sorted(spec)}")
            spec = RewardSpec(**spec)
        if not isinstance(spec, RewardSpec):
            raise RewardError(f"{where}: expected {{fn: <import path>, weight: <number>}}, got {spec!r}")
        rewards.append(Reward(spec, where))
    names = [r.name for r in rewards]
    if len(set(names)) != len(names):
        raise RewardError(
            f"{field_name}: two rewards are both named {next(n for n in names if names.count(n) > 1)!r}; "
            "give one a different `name`"
        )
    return rewards


def score(
    rewards: Sequence[Reward], prompts: Sequence[Any], completions: Sequence[str], rows: Sequence[dict]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(weighted total per completion, each reward's raw values by name), as float64 tensors."""
    parts = {r.name: torch.tensor(r.score(prompts, completions, rows), dtype=torch.float64) for r in rewards}
    total = torch.zeros(len(completions), dtype=torch.float64)
    for r in rewards:
        total += r.weight * parts[r.name]
    return total, parts
