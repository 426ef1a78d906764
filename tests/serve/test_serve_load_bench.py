"""bench/serve_load.py end to end on the CPU: its own server on a micro model, two client
processes. The figures it prints are what issue 18's comparisons rest on, so the request and
token counts must add up exactly: every request's output length is known from the seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MICRO = {
    "vocab_size": 512,
    "dim": 32,
    "n_layers": 1,
    "n_heads": 2,
    "n_kv_heads": 1,
    "ffn_dim": 64,
    "norm_eps": 1e-06,
    "max_len": 512,
    "rope_theta": 10000.0,
    "tie_embeddings": True,
}


def drawn_output_lengths(num_requests: int, prompt_len, output_len, vocab: int, seed: int) -> list[int]:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from workloads import draw
    finally:
        sys.path.remove(str(REPO / "bench"))
    return [n for _, n in draw(num_requests, prompt_len, output_len, vocab, seed)]


@pytest.mark.slow
def test_the_load_generator_spreads_requests_over_client_processes_and_counts_every_token(tmp_path):
    config = tmp_path / "micro.json"
    config.write_text(json.dumps(MICRO))
    argv = [
        sys.executable,
        "bench/serve_load.py",
        "--model",
        str(config),
        "--num-requests",
        "8",
        "--client-procs",
        "2",
        "--prompt-len",
        "8",
        "32",
        "--output-len",
        "4",
        "24",
        "--temperature",
        "0",
        "--no-warmup",
        "--json",
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])

    assert (summary["requests"], summary["failed"], summary["connection_errors"]) == (8, 0, 0)
    assert summary["vocab_size"] <= MICRO["vocab_size"]  # the ids the server accepts: its tokenizer's
    expected = sum(drawn_output_lengths(8, [8, 32], [4, 24], summary["vocab_size"], seed=0))
    assert summary["output_tokens"] == summary["expected_output_tokens"] == expected
    assert summary["client_procs"] == 2 and len(summary["client_cpu_per_proc_s"]) == 2
    assert summary["client_cpu_s"] > 0 and 0 < summary["client_busiest_core_frac"]
    roles = {p["role"] for p in summary["server_cpu"]}
    assert "astrai-serve main" in roles and any(r.startswith("inference worker 0") for r in roles)
