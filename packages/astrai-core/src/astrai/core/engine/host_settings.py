"""Settings of the host process that drives a GPU engine.

A decode step on the GPU takes a few milliseconds; the host's share of it (scheduling,
metadata, kernel launches) is measured in tens of microseconds per item, so two process-wide
defaults that suit CPU number crunching cost the engine real time:
- torch's intra-op thread pool: a GPU engine's host ops are tiny, and the pool's threads spin
  after each parallel region, contending with the thread that launches kernels: with a full
  pool a large prefill step is bound by its launches, with one thread by the GPU;
- the cyclic garbage collector: a full collection walks every live object (torch, the model,
  the tokenizer: hundreds of thousands) and stalls the engine for longer than several steps.
Measured: see bench/RESULTS.md, 2026-11-25 row "`diag` host timing of `decode256`".

And one setting of the calling thread that must not reach the engine: autocast (own_numerics).
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch

log = logging.getLogger(__name__)


def limit_cpu_threads(device: torch.device) -> None:
    """One torch CPU thread for a process that drives a CUDA engine, unless OMP_NUM_THREADS
    says otherwise (the user's choice wins). A CPU engine keeps the pool: its model runs there."""
    if device.type != "cuda" or "OMP_NUM_THREADS" in os.environ or torch.get_num_threads() == 1:
        return
    log.info(
        "torch CPU threads %d -> 1: the host only schedules and launches GPU work "
        "(set OMP_NUM_THREADS to choose another number)",
        torch.get_num_threads(),
    )
    torch.set_num_threads(1)


def quiet_gc() -> None:
    """Move everything alive now out of the garbage collector's sight, so full collections walk
    only what was made since. Call once a process is set up (a server after start-up); objects
    alive now are never collected, so not between engines that come and go."""
    gc.collect()
    gc.freeze()
    # The collector skips full collections until a quarter as many objects as the last full
    # collection left behind have piled up; after the freeze that count would still be the
    # frozen hundreds of thousands, and cyclic garbage (abandoned streams) would linger.
    gc.collect()


@contextmanager
def paused_gc() -> Iterator[None]:
    """The cyclic collector off for a block (a blocking `generate`): a process that was not
    quieted (a trainer generating its rollouts in-process: Lightning, the compiled graphs and
    the datasets are millions of objects) would otherwise walk its whole heap several times a
    batch. Cycles made meanwhile are collected after the block; the collector is only turned
    back on if it was on."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def own_numerics(device: torch.device):
    """The calling thread's autocast off for the engine's work on `device`: the engine computes
    in its model's and cache's dtypes. A trainer generating rollouts in-process calls the engine
    inside its training step, under Lightning's mixed-precision autocast: a float32 engine's
    keys then came out bfloat16 and could not be stored in its float32 cache, and a bfloat16
    engine's softmaxes and norms ran in float32 (autocast's float32 op list), in its captured
    CUDA graphs too, giving other log-probs than the same engine outside a training step.
    Without autocast on (a server, a plain script) nothing is entered: a step's context costs
    a check, not an autocast context's few microseconds."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return nullcontext()
