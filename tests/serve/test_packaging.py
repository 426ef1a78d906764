"""`astrai-serve` installs from its wheels into a fresh venv without the training stack, and serves.

The install is a user's: `uv build` makes the two wheels (fetching the build backend from the
package index if the cache lacks it), and `uv pip install` installs them with the locked versions
of astrai-serve's own dependency closure (`uv export --package astrai-serve`), reading the index
for whatever uv's cache does not hold. `uv pip check` then proves the installed set satisfies
what the two wheels declare. Nothing here may lean on a warm cache: `.ci/run` runs the suite
with an empty, throw-away `UV_CACHE_DIR`, as a user's first `uv run pytest` would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
TRAINING_ONLY = ("lightning", "torchmetrics", "datasets", "jsonargparse")


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.slow
def test_serve_wheel_installs_and_serves_without_the_training_stack(tmp_path, model_dir, launch, free_port):
    uv = os.environ.get("UV") or shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH")
    dist = tmp_path / "dist"
    for package in ("astrai-core", "astrai-serve"):
        run(uv, "build", "--package", package, "--wheel", "--out-dir", dist, cwd=REPO)
    wheels = sorted(dist.glob("*.whl"))
    assert [w.name.split("-")[0] for w in wheels] == ["astrai_core", "astrai_serve"]

    requirements = run(
        uv,
        "export",
        "--package",
        "astrai-serve",
        "--no-dev",
        "--frozen",
        "--no-emit-workspace",
        "--no-hashes",
        cwd=REPO,
    ).stdout
    pinned = {line.split("==")[0] for line in requirements.splitlines() if "==" in line}
    assert {"torch", "litserve", "tokenizers", "safetensors", "pyyaml"} <= pinned
    assert not pinned & set(TRAINING_ONLY), "the serving install would pull in training packages"
    (tmp_path / "requirements.txt").write_text(requirements)

    venv = tmp_path / "venv"
    try:  # the venv holds a copy of torch with its CUDA libraries (GBs): freed whatever happens
        python = venv / "bin" / "python"
        run(uv, "venv", "--python", sys.executable, venv)
        run(uv, "pip", "install", "--no-deps", "--python", python, "-r", tmp_path / "requirements.txt", *wheels)
        run(uv, "pip", "check", "--python", python)
        for module in TRAINING_ONLY:
            proc = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True)
            assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr, f"{module} is importable"

        help_text = run(venv / "bin" / "astrai-serve", "--help").stdout
        assert "--model" in help_text and "--api-key" in help_text

        # The installed command serves a real request (cwd outside the repo: only the venv is used).
        port = free_port()
        server = launch(
            [venv / "bin" / "astrai-serve", "--model", model_dir, "--port", port, "--device", "cpu"],
            port,
            tmp_path / "server.log",
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": ""},
        )
        try:
            server.wait_ready()
            r = httpx.post(server.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 3}, timeout=60)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        finally:
            server.stop()
        location = run(python, "-c", "import astrai.serve; print(astrai.serve.__file__)").stdout
        assert location.startswith(str(venv))
    finally:
        shutil.rmtree(venv, ignore_errors=True)
