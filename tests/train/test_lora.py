"""LoRA adapters: exact start from the base model, only adapters train, merging is exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from astrai.core.config import ModelConfig
from astrai.core.transformer import CausalLM
from astrai.train.lora import LoRAConfig, LoRALinear, adapters_disabled, apply_lora, merge_lora, merge_lora_state_dict


def _model(seed=0) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, init_std=0.2))


def _ids():
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def _perturb_adapters(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def test_fresh_adapters_leave_the_model_unchanged_and_only_they_train():
    model = _model()
    before = model(_ids())
    keys = set(model.state_dict())
    wrapped = apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"]))
    assert wrapped == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    torch.testing.assert_close(model(_ids()), before, rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{w}.lora_{ab}" for w in wrapped for ab in "AB"}
    # base keys unchanged; two new tensors per wrapped layer
    assert set(model.state_dict()) == keys | trainable


def test_merge_gives_the_adapted_model_exactly():
    model = _model()
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=["all-linear"]))
    _perturb_adapters(model)
    adapted = model(_ids())
    with adapters_disabled(model):
        base = model(_ids())
    assert not torch.allclose(adapted, base)
    torch.testing.assert_close(base, _model()(_ids()))  # disabled adapters = the base model

    merged_sd = merge_lora_state_dict(model.state_dict(), LoRAConfig(rank=4, alpha=8).scaling)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("proj"))
    torch.testing.assert_close(model(_ids()), adapted, rtol=1e-5, atol=1e-5)
    # the state-dict merge (used by export) is the same merge
    fresh = _model()
    fresh.load_state_dict(merged_sd)
    torch.testing.assert_close(fresh(_ids()), adapted, rtol=1e-5, atol=1e-5)


def test_scaling_is_alpha_over_rank():
    layer = nn.Linear(6, 5)
    lora = LoRALinear(layer, rank=2, alpha=6.0)
    with torch.no_grad():
        lora.lora_B.fill_(1.0)
    x = torch.randn(3, 6)
    expected = layer(x) + 3.0 * (x @ lora.lora_A.T @ lora.lora_B.T)
    torch.testing.assert_close(lora(x), expected)


def test_gradients_reach_only_the_adapters():
    model = _model()
    apply_lora(model, LoRAConfig(rank=2, targets=["q_proj"]))
    model(_ids()).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name


def test_bad_lora_settings_are_named():
    with pytest.raises(ValueError, match="lora.targets .* matched no linear layer.*q_proj"):
        apply_lora(_model(), LoRAConfig(targets=["query"]))
    with pytest.raises(ValueError, match="lora.rank"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="lora.dropout"):
        LoRAConfig(dropout=1.0)
