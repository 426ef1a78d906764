"""The benchmark workloads shared by bench/engine_throughput.py and bench/serve_load.py.

Both benches draw their requests here so that the engine alone and the engine behind HTTP are
timed on the same requests, token for token, for the same seed and vocabulary: the share of
the engine's throughput that the server delivers is then a like-for-like ratio. This module
imports nothing heavy, so serve_load's spawned client processes can load it cheaply.
"""

from __future__ import annotations

import random

# Presets: request count, length ranges (inclusive) and the engine sizes both benches use.
WORKLOADS = {
    "decode256": dict(
        num_requests=256, prompt_len=[256, 256], output_len=[256, 256], max_batch_size=256, max_num_batched_tokens=8192
    ),
    "mixed": dict(
        num_requests=256,
        prompt_len=[100, 1024],
        output_len=[100, 1024],
        max_batch_size=256,
        max_num_batched_tokens=8192,
    ),
    "short": dict(
        num_requests=512, prompt_len=[16, 128], output_len=[64, 128], max_batch_size=256, max_num_batched_tokens=8192
    ),
}
FIRST_ORDINARY_ID = 5  # our special tokens take ids 0..4: prompts stay clear of them


def draw(num_requests: int, prompt_len, output_len, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    """(prompt ids, output length) per request. The draw order (prompt length, output length,
    then the ids) is part of the workload's identity: changing it changes every figure."""
    rng = random.Random(seed)
    reqs = []
    for _ in range(num_requests):
        n_prompt, n_out = rng.randint(*prompt_len), rng.randint(*output_len)
        reqs.append(([rng.randrange(FIRST_ORDINARY_ID, vocab) for _ in range(n_prompt)], n_out))
    return reqs


def arrival_delays(num_requests: int, rate: float | None, seed: int) -> list[float]:
    """Seconds after the start at which each request is sent: all at once, or Poisson arrivals
    at `rate` requests/s (the same draws in both benches)."""
    rng = random.Random(seed + 1)
    delays, t = [], 0.0
    for _ in range(num_requests):
        delays.append(t)
        if rate:
            t += rng.expovariate(rate)
    return delays
