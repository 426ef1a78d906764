"""What the quickstart measures on held-out questions, one value per question, so that a change
can be told from noise.

A stage "helped" only when its after-minus-before difference is larger than the noise of that
difference. Both measures here are taken on the same questions before and after a stage, so
the difference is paired: its standard error is the spread of the per-question differences
over the square root of their number (``paired_change``). That is much smaller than the
spread of either mean alone, because how hard a question is cancels out.

- ``greedy_answers``: the greedy reply to every question (through the inference engine) and
  whether it equals the reference word for word;
- ``sampled_rewards``: the mean reward of ``samples`` replies sampled at ``temperature`` for
  every question, with a fixed seed per question, so a rerun draws alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..rewards import Reward, score
from ..sampled_pairs import chat_prompts, load_engine
from .corpus import Question, is_correct


@dataclass(frozen=True)
class Change:
    """A paired difference: mean of (after - before) over the items, and its standard error."""

    before: float
    after: float
    delta: float
    stderr: float

    @property
    def z(self) -> float:
        """delta in standard errors (inf for a change without spread, 0 for none at all)."""
        if self.stderr > 0:
            return self.delta / self.stderr
        return 0.0 if self.delta == 0 else math.copysign(math.inf, self.delta)


def paired_change(before: Sequence[float], after: Sequence[float]) -> Change:
    if len(before) != len(after) or len(before) < 2:
        raise ValueError(
            f"paired_change needs two equally long sequences of >= 2 values, got {len(before)} and {len(after)}"
        )
    n = len(before)
    diffs = [a - b for a, b in zip(after, before)]
    delta = sum(diffs) / n
    variance = sum((d - delta) ** 2 for d in diffs) / (n - 1)
    return Change(sum(before) / n, sum(after) / n, delta, math.sqrt(variance / n))


def greedy_answers(
    model_dir: Path, questions: Sequence[Question], max_tokens: int = 32
) -> tuple[list[float], list[str]]:
    """Per question 1.0 when the greedy reply equals the reference, else 0.0; and the replies."""
    from astrai.core.engine import SamplingParams

    engine, tok = load_engine(model_dir)
    prompts = chat_prompts(tok, [q.prompt for q in questions])
    outputs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    replies = [o.samples[0].text for o in outputs]
    return [float(is_correct(r, q)) for r, q in zip(replies, questions)], replies


def sampled_rewards(
    model_dir: Path,
    questions: Sequence[Question],
    rewards: Sequence[Reward],
    samples: int = 16,
    temperature: float = 1.0,
    max_tokens: int = 24,
    seed: int = 0,
) -> list[float]:
    """Per question the mean total reward of ``samples`` sampled replies."""
    from astrai.core.engine import SamplingParams

    engine, tok = load_engine(model_dir, max_batch_size=max(64, samples))
    prompts = chat_prompts(tok, [q.prompt for q in questions])
    params = [
        SamplingParams(n=samples, temperature=temperature, max_tokens=max_tokens, seed=seed * 100_003 + i)
        for i in range(len(questions))
    ]
    outputs = engine.generate(prompts, params)
    texts = [s.text for o in outputs for s in o.samples]
    rows = [
        {"prompt": q.prompt, "answer": q.answer, "reference": q.reference} for q in questions for _ in range(samples)
    ]
    total, _ = score(rewards, [r["prompt"] for r in rows], texts, rows)
    values = total.tolist()
    return [sum(values[i * samples : (i + 1) * samples]) / samples for i in range(len(questions))]
