"""bench/train_throughput.py's timing window: with gradient accumulation its StepTimer is called
after every micro-batch, several times with the same optimizer-step count, and the window must
still span exactly the timed optimizer steps (it once reopened on each micro-batch of the first
timed step, so with 32 micro-batches a step two timed steps were measured over 33 of them and
tokens/s came out 1.94x too high)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    sys.modules.pop("train_throughput", None)
    import train_throughput

    yield train_throughput
    sys.modules.pop("train_throughput", None)


@pytest.mark.parametrize("warmup,steps,accumulate", [(1, 2, 32), (2, 3, 4), (0, 2, 3), (1, 2, 1)])
def test_the_window_spans_the_timed_optimizer_steps_whatever_the_accumulation(
    bench, monkeypatch, warmup, steps, accumulate
):
    ticks = {"now": 0}  # one tick per micro-batch: time counts micro-batches
    monkeypatch.setattr(bench.time, "perf_counter", lambda: ticks["now"])
    window = bench.Window(warmup, steps, torch.device("cpu"))
    window.after_step(0)  # before the first batch, as StepTimer.on_train_start and timed_loop do
    done, closed = 0, []
    for _ in range(warmup + steps + 1):  # one step more: later calls must not move the window
        for micro in range(accumulate):
            ticks["now"] += 1
            done += micro == accumulate - 1  # the optimizer steps at the last micro-batch
            closed.append(window.after_step(done))
    assert window.end - window.start == steps * accumulate  # micro-batches inside the window
    assert window.step_seconds == accumulate
    assert window.each_step_ms == [accumulate * 1e3] * steps  # each timed step on its own
    assert closed.count(True) == 1
