"""Fixtures for the engine tests: a tiny trained tokenizer and a tiny random model."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

# The suite runs with --import-mode=importlib, which puts no test folder on sys.path: add this
# one so the test files can import their shared helpers.
sys.path.insert(0, str(Path(__file__).parent))
from engine_helpers import WORDS, tiny_model  # noqa: E402

from astrai.core.tokenizer_trainer import train_tokenizer


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matmuls gain nothing from a second thread, and on a busy 2-core machine an OpenMP
    # team waiting for a descheduled thread makes each op hundreds of times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer():
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20))) + "." for _ in range(400)]
    return train_tokenizer(iter(corpus), vocab_size=320, min_frequency=2, show_progress=False)


@pytest.fixture(scope="session")
def model(tokenizer):
    return tiny_model(tokenizer.vocab_size)
