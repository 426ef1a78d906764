"""Prometheus text exposition for GET /metrics, without a prometheus_client dependency.

HTTP-side counters live in the API-server process; engine gauges come from engine.stats()
in the worker. The format is the plain text one (version 0.0.4) every scraper reads.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Latency buckets in seconds, wide enough for CPU serving of small models.
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, math.inf)


class _Histogram:
    def __init__(self) -> None:
        self.counts = [0] * len(BUCKETS)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.sum += value
        for i, bound in enumerate(BUCKETS):
            if value <= bound:
                self.counts[i] += 1


class Metrics:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.aborted = 0
        self.latency = _Histogram()
        self.ttft = _Histogram()

    def request_done(self, route: str, status: int) -> None:
        self.requests[(route, status)] += 1

    def render(self, engine_stats: dict[str, Any]) -> str:
        lines = ["# HELP astrai_requests_total HTTP requests by route and status code.",
                 "# TYPE astrai_requests_total counter"]
        for (route, status), count in sorted(self.requests.items()):
            lines.append(f'astrai_requests_total{{route="{route}",status="{status}"}} {count}')
        for name, value, help in (
            ("astrai_prompt_tokens_total", self.prompt_tokens, "Prompt tokens of finished requests."),
            ("astrai_generation_tokens_total", self.generation_tokens, "Generated tokens of finished requests."),
            ("astrai_client_disconnects_total", self.aborted, "Requests aborted because the client went away."),
        ):
            lines += [f"# HELP {name} {help}", f"# TYPE {name} counter", f"{name} {value}"]
        for name, hist, help in (
            ("astrai_request_duration_seconds", self.latency, "Time from request to last token."),
            ("astrai_time_to_first_token_seconds", self.ttft, "Time from request to first streamed token."),
        ):
            lines += [f"# HELP {name} {help}", f"# TYPE {name} histogram"]
            for bound, count in zip(BUCKETS, hist.counts):
                le = "+Inf" if math.isinf(bound) else repr(bound)
                lines.append(f'{name}_bucket{{le="{le}"}} {count}')
            lines += [f"{name}_sum {hist.sum}", f"{name}_count {hist.counts[-1]}"]
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
