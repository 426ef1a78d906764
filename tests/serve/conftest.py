"""Fixtures for the serving tests: a tiny model directory and one real server per session.

The model is random (init_std 0.2 keeps logits O(1), so greedy choices are well separated)
and the tokenizer is trained here on a few bilingual lines; nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from astrai.core.auto import AutoModel
from astrai.core.config import ModelConfig
from astrai.core.tokenizer_trainer import train_tokenizer

API_KEY = "test-key"
MODEL_NAME = "tiny-serve"
MAX_LEN = 2048
REPO = Path(__file__).resolve().parents[2]

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Small language models can run on a laptop.",
    "Hello, how are you today? I am fine, thank you.",
    "今天天气很好，我们去公园散步吧。",
    "机器学习是人工智能的一个分支。",
    "你好，世界！Hello, world!",
    "Numbers like 12345 and 3.14 appear in text.",
] * 20


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve") / "tiny-model"
    tokenizer = train_tokenizer(iter(TEXTS), vocab_size=320, min_frequency=2, show_progress=False)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=128,
        max_len=MAX_LEN,
        init_std=0.2,
        tie_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(1234)
    model = AutoModel.from_config(config)
    AutoModel.save_pretrained(model, path, tokenizer=tokenizer)
    return path


@pytest.fixture(scope="session")
def free_port():
    """free_port() -> a TCP port nobody listens on."""
    return _free_port


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_command(*args) -> list[str]:
    return [sys.executable, "-m", "astrai.serve.cli", *map(str, args)]


@pytest.fixture(scope="session")
def serve_command():
    """serve_command(*args) -> argv that runs `astrai-serve` with this interpreter."""
    return _serve_command


def stop(proc: subprocess.Popen) -> None:
    """SIGINT to the whole process group (LitServe's graceful path), SIGKILL if it lingers; a
    group whose main process already ended gets SIGKILL, so no test leaves its workers behind."""
    if proc.poll() is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


class Server:
    """A running `astrai-serve` process (its own process group) and how to reach it."""

    api_key = API_KEY
    model = MODEL_NAME
    max_len = MAX_LEN

    def __init__(self, argv: list, port: int, log: Path, model_dir: Path | None = None, **popen) -> None:
        self.port, self.log, self.model_dir = port, log, model_dir
        self.url = f"http://127.0.0.1:{port}"
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                [str(a) for a in argv], stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **popen
            )

    def wait_ready(self, timeout: float = 240) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log.read_text()}")

    @property
    def headers(self) -> dict[str, str]:
        """The key in OpenAI's header (servers without a key ignore it)."""
        return {"Authorization": f"Bearer {self.api_key}"}

    def stats(self) -> dict:
        return httpx.get(self.url + "/stats", headers=self.headers, timeout=10).json()

    def stop(self) -> None:
        stop(self.proc)


@pytest.fixture(scope="session")
def launch():
    """launch(argv, port, log, model_dir=None, **popen) -> Server (started, not yet ready)."""
    return Server


def start_cpu_server(model_dir: Path, log: Path, *extra) -> Server:
    """`astrai-serve` of the test model on the CPU on a free port (MODEL_NAME, one torch
    thread), with `extra` arguments; started, not yet ready."""
    port = _free_port()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    argv = _serve_command(
        "--model", model_dir, "--port", port, "--device", "cpu", "--served-model-name", MODEL_NAME, *extra
    )  # fmt: skip
    return Server(argv, port, log, model_dir, env=env, cwd=REPO)


@pytest.fixture
def cpu_server(model_dir, tmp_path):
    """cpu_server(*extra_args) -> a ready `astrai-serve` of its own on the CPU (the test model,
    MODEL_NAME, one torch thread), stopped after the test."""
    started = []

    def start(*extra) -> Server:
        started.append(start_cpu_server(model_dir, tmp_path / f"server-{len(started)}.log", *extra))
        return started[-1].wait_ready()

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture(scope="session")
def server(model_dir, tmp_path_factory):
    """The real `astrai-serve` on a free port, with an API key; one per test session."""
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    srv = start_cpu_server(model_dir, log, "--api-key", API_KEY, "--max-batch-size", "32", "--log-level", "info")
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()
