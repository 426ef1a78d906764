"""Fixtures for the model, config, checkpoint and Hugging Face parity tests: tiny shapes only.

A test that takes a `model_arch` argument runs once per architecture path below.
"""

from __future__ import annotations

import pytest
import torch

from astrai.core.config import ModelConfig
from astrai.core.transformer import CausalLM

ARCHITECTURES = {
    "gqa": {},
    "bias": {"attn_bias": True},
    "qk_norm": {"qk_norm": True},
    "qk_norm_after_rope": {"qk_norm": True, "qk_norm_after_rope": True},  # upstream AstrAI's order
    "gated": {"gated_attn": True},
    "mla": {"attn_type": "mla", "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 12},
    "mla_qlora_gated": {
        "attn_type": "mla",
        "q_lora_rank": 24,
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 8,
        "v_head_dim": 12,
        "gated_attn": True,
    },
    "moe": {
        "ffn_type": "moe",
        "n_routed_experts": 4,
        "n_shared_experts": 1,
        "n_activated_experts": 2,
        "moe_ffn_dim": 24,
    },
}


def pytest_generate_tests(metafunc):
    if "model_arch" in metafunc.fixturenames:
        metafunc.parametrize("model_arch", list(ARCHITECTURES))


def _tiny_config(arch: str = "gqa", **overrides) -> ModelConfig:
    # A large init std makes logits O(1), so numerical comparisons mean something.
    fields = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_len=64, init_std=0.2)
    fields.update(ARCHITECTURES[arch])
    fields.update(overrides)
    return ModelConfig(**fields)


def _randomize(model: torch.nn.Module, scale: float = 0.2) -> torch.nn.Module:
    """Random values in every parameter, norms and biases included: their usual inits (1 and 0)
    would hide a weight-mapping mix-up between them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + scale * torch.randn_like(p))
            else:
                p.normal_(0.0, scale)
    return model


@pytest.fixture
def tiny_config():
    """tiny_config(arch="gqa", **overrides) -> ModelConfig"""
    return _tiny_config


@pytest.fixture
def randomize():
    """randomize(model, scale=0.2) -> model, every parameter random (in place)."""
    return _randomize


@pytest.fixture
def make_model():
    """make_model(arch="gqa", dtype=torch.float32, **overrides) -> a random tiny CausalLM in eval mode."""

    def make(arch: str = "gqa", dtype=torch.float32, **overrides) -> CausalLM:
        return _randomize(CausalLM(_tiny_config(arch, **overrides)).to(dtype)).eval()

    return make
