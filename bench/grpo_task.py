"""The toy verifiable task that bench/grpo_throughput.py trains on, shared by every framework
it compares (ours and TRL's), so that they see the same prompts and the same reward.

A prompt asks for a sum of two numbers; the reward is astrai.train.rewards.answer_match (1 when
the completion's final number is the sum). A random-weight model almost never earns it, which
does not matter for throughput: every framework generates, scores and trains on the same
amount of tokens either way.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from astrai.train.rewards import answer_match


def write_prompts(path: Path, count: int, seed: int = 0) -> Path:
    """`count` rows ``{"prompt": "What is 12 + 34?", "answer": "46"}`` as JSONL."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for _ in range(count):
            a, b = rng.randint(10, 999), rng.randint(10, 999)
            f.write(json.dumps({"prompt": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n")
    return path


def sum_reward(prompts, completions, answer, **_) -> list[float]:
    """TRL's reward-function signature (dataset columns arrive as keyword lists) around the
    same answer_match that our GRPO run names in its YAML."""
    return [answer_match(p, c, {"answer": a}) for p, c, a in zip(prompts, completions, answer)]
