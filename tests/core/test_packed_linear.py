"""Packed q/k/v and gate/up projections: same outputs as the separate linears, and the model
still behaves as a model (weights load in place, training sees its Parameters, a cast falls
back, checkpoints save)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from astrai.core.checkpoint import load_pretrained, save_pretrained
from astrai.core.packed_linear import PackedLinear, pack_projections

IDS = torch.tensor([[5, 17, 3, 88, 41, 9, 60, 2]])


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids)


def _packs(model) -> list:
    return [m.packed for m in model.modules() if getattr(m, "packed", None) is not None]


@pytest.mark.parametrize("arch", ["gqa", "bias", "qk_norm", "gated", "moe"])
def test_packed_model_gives_the_logits_of_the_separate_linears(arch, make_model):
    model = make_model(arch)
    reference = copy.deepcopy(model)
    n_layers, n_mlps = model.config.n_layers, sum(1 for m in model.modules() if type(m).__name__ == "MLP")
    assert pack_projections(model) == n_layers + n_mlps
    assert all(p.intact() for p in _packs(model))
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=1e-5, atol=1e-5)


def test_gated_attention_with_biased_qkv_stays_unpacked(make_model):
    model = make_model("gated", attn_bias=True)  # the gate has no bias: q/k/v/gate are not one GEMM
    pack_projections(model)
    assert all(layer.self_attn.packed is None for layer in model.model.layers)
    assert all(layer.mlp.packed is not None for layer in model.model.layers)


def test_mla_is_left_alone(make_model):
    model = make_model("mla")
    reference = copy.deepcopy(model)
    assert pack_projections(model) == model.config.n_layers  # the MLPs only
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=1e-5, atol=1e-5)


def test_weights_loaded_in_place_reach_the_packed_weight(make_model, randomize):
    """The engine's load_weights / GRPO sync: copy_ into state_dict() tensors."""
    model = make_model("qk_norm")
    pack_projections(model)
    other = randomize(copy.deepcopy(model))  # deep copy: own storage, packs no longer intact
    assert not any(p.intact() for p in _packs(other))
    own = model.state_dict()
    with torch.no_grad():
        for name, tensor in other.state_dict().items():
            own[name].copy_(tensor)
    assert all(p.intact() for p in _packs(model))
    torch.testing.assert_close(_logits(model), _logits(other), rtol=1e-5, atol=1e-5)


def test_a_cast_after_packing_falls_back_to_the_separate_linears(make_model):
    model = make_model("gqa")
    reference = copy.deepcopy(model).double()
    pack_projections(model)
    model.double()
    assert not any(p.intact() for p in _packs(model))
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=1e-12, atol=1e-12)


def test_training_after_packing_gives_the_parameters_their_gradients(make_model):
    model = make_model("gqa")
    reference = copy.deepcopy(model)
    pack_projections(model)
    for m in (model, reference):
        m(IDS).logsumexp(-1).sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_a_packed_model_saves_and_loads(make_model, tmp_path):
    model = make_model("bias")
    pack_projections(model)
    save_pretrained(model, tmp_path / "ckpt")  # weights are views into the packed tensors
    loaded = load_pretrained(tmp_path / "ckpt")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_packed_linear_splits_in_order_and_rejects_mixed_layers():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3), nn.Linear(4, 5)
    x = torch.randn(2, 4)
    want = [a(x).detach(), b(x).detach()]
    packed = PackedLinear([a, b])
    assert packed.weight.shape == (8, 4) and a.weight.data_ptr() == packed.weight.data_ptr()
    with torch.no_grad():
        got = packed(x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    with pytest.raises(ValueError, match="one input size"):
        PackedLinear([nn.Linear(4, 3), nn.Linear(5, 3)])
    with pytest.raises(ValueError, match="a bias or none"):
        PackedLinear([nn.Linear(4, 3), nn.Linear(4, 3, bias=False)])


def test_the_engine_packs_the_model_it_serves(make_model):
    from astrai.core.engine import InferenceEngine, SamplingParams

    model = make_model("qk_norm")
    reference = copy.deepcopy(model)
    engine = InferenceEngine(model, None, max_batch_size=2, max_num_batched_tokens=16)
    assert all(layer.self_attn.packed.intact() and layer.mlp.packed.intact() for layer in model.model.layers)
    out = engine.generate([IDS[0].tolist()], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    ids = IDS
    for _ in range(4):  # greedy by full recompute on the unpacked copy
        ids = torch.cat([ids, _logits(reference, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.samples[0].token_ids == ids[0, IDS.shape[1] :].tolist()
