"""pass@k for code tasks: every candidate program runs in its own Python subprocess, with a timeout.

lm-eval's own HumanEval metric loads Hugging Face ``evaluate``'s ``code_eval`` from the Hub; this
one needs nothing downloaded. A candidate is the task prompt plus the model's completion
(``prompt_plus_completion``, the task's filter); it passes when the candidate followed by the
task's test code exits with status 0 within ``timeout`` seconds. The subprocess runs in an empty
temporary folder with stdin closed and its own process group, killed whole on timeout.

Running model-written code is only safe in a sandbox: tasks that use this metric set
``unsafe_code: true``, and lm-eval refuses them unless the run opts in
(``astrai-eval --confirm-run-unsafe-code``).

pass@k is the unbiased estimator of Chen et al. (2021): with n samples of which c pass,
``1 - C(n - c, k) / C(n, k)``, averaged over problems.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from math import comb
from pathlib import Path

from astrai.core.errors import require


def estimate_pass_at_k(n: int, c: int, k: int) -> float:
    """Chance that at least one of k samples drawn (without replacement) from n, c of them right, is right."""
    return 1.0 if n - c < k else 1.0 - comb(n - c, k) / comb(n, k)


def run_program(source: str, timeout: float) -> bool:
    """Whether `source` exits with status 0 within `timeout` seconds in a fresh interpreter."""
    with tempfile.TemporaryDirectory(prefix="astrai-code-") as folder:
        path = Path(folder) / "candidate.py"
        path.write_text(source, encoding="utf-8")
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-I", str(path)],
            cwd=folder,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            return proc.wait(timeout=timeout) == 0
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return False


def pass_at_k(
    references: Sequence[str], predictions: Sequence[Sequence[str]], k: int | Sequence[int] = 1, timeout: float = 10.0
) -> dict[str, float]:
    """{"pass@k": score} for each k: references[i] is problem i's test code, predictions[i] its
    candidate programs (lm-eval calls this once per problem, with one of each)."""
    ks = [k] if isinstance(k, int) else list(k)
    n_samples = min(map(len, predictions), default=0)
    for wanted in ks:
        require(
            wanted <= n_samples,
            "metric_list.k",
            f"asks for pass@{wanted} from {n_samples} samples per problem; set the task's repeats to at least {wanted}",
        )
    programs = [(i, f"{candidate}\n\n{test}\n") for i, test in enumerate(references) for candidate in predictions[i]]
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        passed = list(pool.map(lambda item: run_program(item[1], timeout), programs))
    correct = [0] * len(references)
    for (i, _), ok in zip(programs, passed):
        correct[i] += ok
    return {
        f"pass@{wanted}": sum(
            estimate_pass_at_k(len(predictions[i]), correct[i], wanted) for i in range(len(references))
        )
        / len(references)
        for wanted in ks
    }


def prompt_plus_completion(resps: Sequence[Sequence[str]], docs: Sequence[dict]) -> list[list[str]]:
    """The task's filter: each completion appended to its problem's prompt, a whole program."""
    return [[doc["prompt"] + completion for completion in completions] for completions, doc in zip(resps, docs)]
