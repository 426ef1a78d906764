"""Fixtures for the training tests: a tiny bilingual tokenizer, a tiny model config, small
learnable data and a quiet CPU Trainer (helpers in train_helpers.py).

Shared by the "modules" and the "data" tests: either side may add fixtures here (append,
keep them tiny and download-free).
"""

from __future__ import annotations

import json

import pytest
from train_helpers import CORPUS, QUIET_WARNINGS, TINY_MODEL, TinyData, make_trainer, save_random_model

from astrai.core.tokenizer_trainer import train_tokenizer


def pytest_configure(config):
    for message in QUIET_WARNINGS:
        config.addinivalue_line("filterwarnings", f"ignore:.*{message}")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer (vocab 320, ChatML template) trained on a few sentences."""
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(iter(CORPUS * 4), vocab_size=320, min_frequency=2, out_dir=out, show_progress=False)
    return str(out)


@pytest.fixture(scope="session")
def model_config_json(tmp_path_factory):
    """A ModelConfig JSON of a 2-layer, 32-wide GQA model (vocab_size comes from the tokenizer)."""
    path = tmp_path_factory.mktemp("model_config") / "tiny.json"
    path.write_text(json.dumps({"vocab_size": 320, **TINY_MODEL}))
    return str(path)


@pytest.fixture
def tiny_data():
    return TinyData


@pytest.fixture
def trainer_factory(tmp_path):
    return lambda **kwargs: make_trainer(tmp_path, **kwargs)


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory, tokenizer_dir):
    """A model directory (random tiny weights + the tokenizer and its chat template) that the
    inference engine can serve."""
    path = tmp_path_factory.mktemp("chat_model") / "model"
    return save_random_model(path, tokenizer_dir, seed=7, **{**TINY_MODEL, "init_std": 0.2})
