"""Prometheus text exposition for GET /metrics, without a prometheus_client dependency.

HTTP-side counters are kept by the API-server processes (--api-servers N); engine gauges come
from engine.stats() in the workers. A scrape reaches one API-server process, yet must report
the whole server, so the counters live in shared memory made before LitServe forks those
processes: one row per process, written only by its own process (no lock needed), summed when
rendered. The format is the plain text one (version 0.0.4) every scraper reads.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import re
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Latency buckets in seconds, wide enough for CPU serving of small models.
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, math.inf)
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/messages")
# Status codes counted one by one; any other is counted under "other".
STATUSES = (200, 400, 401, 403, 404, 405, 408, 413, 415, 422, 429, 499, 500, 502, 503, 504)
_COUNTERS = ("prompt_tokens", "generation_tokens", "aborted")


class _Layout:
    """Offsets of each figure in a row of the shared table."""

    def __init__(self) -> None:
        self.requests = 0  # len(ROUTES) x (len(STATUSES) + 1)
        self.counters = self.requests + len(ROUTES) * (len(STATUSES) + 1)
        self.histograms = {"latency": self.counters + len(_COUNTERS)}
        self.histograms["ttft"] = self.histograms["latency"] + len(BUCKETS) + 1  # buckets, then the sum
        self.size = self.histograms["ttft"] + len(BUCKETS) + 1


_LAYOUT = _Layout()


class Metrics:
    """The server's request counters and latency histograms, shared by its API-server processes.

    `row` is the writing process's index (LitServe's response_queue_id); set it in each process
    before counting.
    """

    def __init__(self, num_rows: int = 1) -> None:
        if num_rows < 1:
            raise ValueError(f"num_rows must be at least 1, got {num_rows}")
        self.num_rows = num_rows
        self._table = mp.get_context("fork").RawArray("d", num_rows * _LAYOUT.size)
        self.row = 0

    def _at(self, offset: int) -> int:
        return self.row * _LAYOUT.size + offset

    # -- counting (the process's own row) -----------------------------------------------
    def request_done(self, route: str, status: int) -> None:
        if route not in ROUTES:
            return
        column = STATUSES.index(status) if status in STATUSES else len(STATUSES)
        self._table[self._at(ROUTES.index(route) * (len(STATUSES) + 1) + column)] += 1

    def add(self, counter: str, value: float) -> None:
        """counter: prompt_tokens, generation_tokens or aborted."""
        self._table[self._at(_LAYOUT.counters + _COUNTERS.index(counter))] += value

    def observe(self, histogram: str, seconds: float) -> None:
        """histogram: latency (request to last token) or ttft (request to first token)."""
        base = _LAYOUT.histograms[histogram]
        for i, bound in enumerate(BUCKETS):
            if seconds <= bound:
                self._table[self._at(base + i)] += 1
        self._table[self._at(base + len(BUCKETS))] += seconds

    # -- reading (all rows) -------------------------------------------------------------
    def total(self, offset: int) -> float:
        return sum(self._table[r * _LAYOUT.size + offset] for r in range(self.num_rows))

    def requests(self) -> dict[tuple[str, str], int]:
        """{(route, status): count} for every pair seen, status as a string ("other" included)."""
        out = {}
        for r, route in enumerate(ROUTES):
            for c, status in enumerate((*map(str, STATUSES), "other")):
                count = int(self.total(r * (len(STATUSES) + 1) + c))
                if count:
                    out[(route, status)] = count
        return out

    def counter(self, name: str) -> float:
        return self.total(_LAYOUT.counters + _COUNTERS.index(name))

    def render(self, engine_stats: dict[str, Any]) -> str:
        lines = [
            "# HELP astrai_requests_total HTTP requests by route and status code.",
            "# TYPE astrai_requests_total counter",
        ]
        for (route, status), count in sorted(self.requests().items()):
            lines.append(f'astrai_requests_total{{route="{route}",status="{status}"}} {count}')
        for name, counter, help in (
            ("astrai_prompt_tokens_total", "prompt_tokens", "Prompt tokens of finished requests."),
            ("astrai_generation_tokens_total", "generation_tokens", "Generated tokens of finished requests."),
            ("astrai_client_disconnects_total", "aborted", "Requests aborted because the client went away."),
        ):
            lines += [f"# HELP {name} {help}", f"# TYPE {name} counter", f"{name} {int(self.counter(counter))}"]
        for name, hist, help in (
            ("astrai_request_duration_seconds", "latency", "Time from request to last token."),
            ("astrai_time_to_first_token_seconds", "ttft", "Time from request to first streamed token."),
        ):
            lines += [f"# HELP {name} {help}", f"# TYPE {name} histogram"]
            base = _LAYOUT.histograms[hist]
            for i, bound in enumerate(BUCKETS):
                le = "+Inf" if math.isinf(bound) else repr(bound)
                lines.append(f'{name}_bucket{{le="{le}"}} {int(self.total(base + i))}')
            lines += [
                f"{name}_sum {self.total(base + len(BUCKETS))}",
                f"{name}_count {int(self.total(base + len(BUCKETS) - 1))}",
            ]
        for key, value in sorted(_flatten(engine_stats).items()):
            name = "astrai_engine_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)
            lines += [f"# TYPE {name} gauge", f"{name} {value}"]
        return "\n".join(lines) + "\n"


def _flatten(stats: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested stats dict, keys joined with '_'; strings and lists are skipped."""
    out: dict[str, float] = {}
    for key, value in stats.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}_"))
        elif isinstance(value, (int, float)):  # bools too, as 0/1
            out[f"{prefix}{key}"] = float(value)
    return out
