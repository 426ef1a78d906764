"""Learning-rate schedules, as multipliers of the base LR for torch's LambdaLR (stepped per optimizer step).

The multipliers are small dataclasses rather than closures: LambdaLR saves the state of
callable objects in its state_dict, so a resumed run continues the same curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch.optim.lr_scheduler import LambdaLR

from astrai.core.errors import require

SCHEDULERS = ("cosine", "sgdr", "constant", "wsd")
# Schedules whose shape depends on the run's length (trainer.max_steps or model.schedule.decay_steps).
NEED_LENGTH = ("cosine", "wsd")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


def _warmup(step: int, warmup_steps: int) -> float:
    # (step + 1): the very first optimizer step already moves the weights.
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def _cosine(progress: float, min_ratio: float) -> float:
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class WarmupConstant:
    warmup_steps: int = 0

    def __call__(self, step: int) -> float:
        return _warmup(step, self.warmup_steps)


@dataclass
class WarmupCosine:
    """Linear warmup, then one cosine from 1 down to min_ratio at total_steps, then flat."""

    warmup_steps: int
    total_steps: int
    min_ratio: float = 0.1

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return _warmup(step, self.warmup_steps)
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return _cosine(progress, self.min_ratio)


@dataclass
class WarmupSGDR:
    """Linear warmup, then cosine cycles with warm restarts (SGDR): the first cycle lasts
    cycle_steps, each next one cycle_mult times longer; every cycle restarts at the full LR."""

    warmup_steps: int
    cycle_steps: int
    cycle_mult: float = 1.0
    min_ratio: float = 0.1

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return _warmup(step, self.warmup_steps)
        t, length = step - self.warmup_steps, float(self.cycle_steps)
        while t >= length:  # few cycles in any real run; a loop is clearer than the log formula
            t -= length
            length *= self.cycle_mult
        return _cosine(t / length, self.min_ratio)


@dataclass
class WarmupStableDecay:
    """WSD (warmup-stable-decay): linear warmup, then the full LR, then over the last
    decay_fraction of total_steps (rounded, at least one step) a decay to min_ratio, then flat
    at min_ratio.

    The decay's shape, over progress p from 0 to 1: "linear" 1 - p, "cosine" (1 + cos(pi p)) / 2,
    or "1-sqrt" 1 - sqrt(p), each rescaled to run from 1 to min_ratio. The stable phase can be
    branched from at any step and decayed separately (Hu et al. 2024, MiniCPM); 1-sqrt is the
    shape Hägele et al. 2024 ("Scaling Laws and Compute-Optimal Training Beyond Fixed Training
    Durations") found best.
    """

    warmup_steps: int
    total_steps: int
    decay_fraction: float = 0.2
    decay_shape: str = "1-sqrt"
    min_ratio: float = 0.0

    @property
    def decay_start(self) -> int:
        return self.total_steps - max(1, round(self.decay_fraction * self.total_steps))

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return _warmup(step, self.warmup_steps)
        start = self.decay_start
        if step < start:
            return 1.0
        p = min(1.0, (step - start) / max(1, self.total_steps - start))
        if self.decay_shape == "linear":
            shape = 1.0 - p
        elif self.decay_shape == "cosine":
            shape = 0.5 * (1 + math.cos(math.pi * p))
        else:
            shape = 1.0 - math.sqrt(p)
        return self.min_ratio + (1 - self.min_ratio) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: Literal["cosine", "sgdr", "constant", "wsd"] = "cosine",
    warmup_steps: int = 0,
    total_steps: int | None = None,
    min_lr_ratio: float = 0.1,
    cycle_steps: int | None = None,
    cycle_mult: float = 1.0,
    decay_fraction: float = 0.2,
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = "1-sqrt",
) -> LambdaLR:
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {name!r}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if name == "constant":
        fn = WarmupConstant(warmup_steps)
    elif name == "cosine":
        if not total_steps or total_steps <= 0:
            raise ValueError(
                "the cosine schedule needs its length: set trainer.max_steps or model.schedule.decay_steps"
            )
        fn = WarmupCosine(warmup_steps, total_steps, min_lr_ratio)
    elif name == "wsd":
        require(
            total_steps and total_steps > 0,
            "the wsd schedule",
            "needs its length: set trainer.max_steps or model.schedule.decay_steps (the length of all three phases)",
        )
        require(
            0.0 < decay_fraction <= 1.0,
            "model.schedule.decay_fraction",
            f"must be in (0, 1] (the share of the steps spent decaying), got {decay_fraction!r}",
        )
        require(
            decay_shape in DECAY_SHAPES,
            "model.schedule.decay_shape",
            f"must be one of {DECAY_SHAPES}, got {decay_shape!r}",
        )
        fn = WarmupStableDecay(warmup_steps, total_steps, decay_fraction, decay_shape, min_lr_ratio)
        require(
            warmup_steps <= fn.decay_start,
            "model.schedule.warmup_steps",
            f"({warmup_steps}) runs into the wsd decay, which starts at step {fn.decay_start} of "
            f"{total_steps}; lower it or model.schedule.decay_fraction",
        )
    else:
        if not cycle_steps or cycle_steps <= 0:
            raise ValueError(f"the sgdr schedule needs cycle_steps > 0, got {cycle_steps!r}")
        if cycle_mult < 1.0:
            raise ValueError(f"cycle_mult must be >= 1, got {cycle_mult}")
        fn = WarmupSGDR(warmup_steps, cycle_steps, cycle_mult, min_lr_ratio)
    return LambdaLR(optimizer, fn)
