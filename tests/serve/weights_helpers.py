"""Shared by the weight-update and remote-rollout tests: servers with an admin key, new random
weights for the test model written as the trainer writes them, and the in-process engine's greedy
answer to compare a server's with."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import API_KEY, Server, start_cpu_server
from safetensors.torch import save_file

from astrai.core.auto import AutoModel
from astrai.core.engine import InferenceEngine, SamplingParams
from astrai.core.tokenizer import AutoTokenizer

ADMIN_KEY = "admin-secret"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
API = {"Authorization": f"Bearer {API_KEY}"}


def start_server(model_dir: Path, log: Path, *extra) -> Server:
    """A CPU `astrai-serve` of the test model with the API key and ADMIN_KEY (not yet ready)."""
    return start_cpu_server(
        model_dir, log, "--api-key", API_KEY, "--admin-key", ADMIN_KEY, "--max-batch-size", "32", *extra
    )


def new_weights(model_dir: Path, seed: int, path: Path) -> torch.nn.Module:
    """A model of the test model's shape with other random weights, written to `path`
    (safetensors, tied tensors once) as RemoteRollout writes them; returns the model."""
    base = AutoModel.from_pretrained(model_dir)
    torch.manual_seed(seed)
    model = AutoModel.from_config(base.config)
    seen, tensors = set(), {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            tensors[name] = tensor.contiguous()
    save_file(tensors, str(path))
    return model


def greedy_in_process(model: torch.nn.Module, model_dir: Path, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """The token ids the in-process engine generates greedily with `model`."""
    engine = InferenceEngine(model, AutoTokenizer.from_pretrained(model_dir))
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return engine.generate([prompt_ids], params)[0].token_ids
