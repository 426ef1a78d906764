"""AutoModel: build a model from a config, or load / save a model directory.

Architectures are looked up in a registry by `model_type`, so a new family registers
itself in one line. Loading and saving live in `checkpoint.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from .config import ModelConfig
from .transformer import CausalLM

MODEL_REGISTRY: dict[str, Callable[[ModelConfig], torch.nn.Module]] = {}


def register_model(model_type: str):
    def wrap(builder):
        MODEL_REGISTRY[model_type] = builder
        return builder

    return wrap


register_model("astrai")(CausalLM)


class AutoModel:
    @staticmethod
    def from_config(config: ModelConfig | dict, model_type: str = "astrai", dtype=None, device=None) -> CausalLM:
        if isinstance(config, dict):
            config = ModelConfig.from_dict(config)
        if model_type not in MODEL_REGISTRY:
            raise KeyError(f"unknown model_type {model_type!r}; registered: {sorted(MODEL_REGISTRY)}")
        with torch.device(device or "cpu"):
            model = MODEL_REGISTRY[model_type](config)
        return model.to(dtype) if dtype is not None else model

    @staticmethod
    def from_pretrained(path: str | Path, dtype: torch.dtype | str | None = None, device=None) -> CausalLM:
        """Load our directory format, a Hugging Face Llama / Qwen2 / Qwen3 / Mistral / Phi-3 / Gemma /
        Mixtral / Qwen2-MoE directory, or an upstream AstrAI one (config.json with model_type
        "autoregressive_lm" or none; see upstream_config.py)."""
        from .checkpoint import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device)

    @staticmethod
    def save_pretrained(model: CausalLM, path: str | Path, tokenizer=None, **kwargs) -> Path:
        """Write a model directory; format="astrai-upstream" writes upstream AstrAI's layout.
        Other keywords (max_shard_size) go to checkpoint.save_pretrained."""
        from .checkpoint import save_pretrained

        return save_pretrained(model, path, tokenizer=tokenizer, **kwargs)
