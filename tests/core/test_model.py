"""CausalLM behaviour: parameter counts, cached decoding, packing, padding, RoPE scalings against
transformers, the MoE balance loss, gradient checkpointing and initialisation.

Equivalence tests run in float64 so that 1e-10 separates a real difference from rounding.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from astrai.core.auto import AutoModel
from astrai.core.config import ModelConfig
from astrai.core.kv_cache_view import ContiguousKVCache
from astrai.core.moe import MoE
from astrai.core.rope import RotaryEmbedding, rope_frequencies
from astrai.core.transformer import CausalLM

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"
TIGHT = 1e-10


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# -- size ------------------------------------------------------------------------------------
def test_astrai_1b_matches_upstreams_released_shape_and_parameter_count():
    """configs/model/astrai-1b.json is upstream AstrAI's released 1B instruct model; its size is
    counted here from that published shape, not from the config, and equals the meta-built model."""
    V, d, L, H, kv, f = 100_000, 1536, 24, 24, 4, 6912  # vocab, hidden, layers, heads, KV heads, FFN
    hd = d // H
    config = ModelConfig.from_json(CONFIGS / "astrai-1b.json")
    assert (config.vocab_size, config.dim, config.n_layers, config.n_heads, config.n_kv_heads) == (V, d, L, H, kv)
    assert (config.head_dim, config.ffn_dim, config.tie_embeddings, config.qk_norm) == (hd, f, False, False)
    assert (config.rope_theta, config.rope_scaling, config.norm_eps, config.max_len) == (10000.0, None, 1e-5, 2048)
    model = AutoModel.from_config(config, device="meta")
    assert all(p.is_meta for p in model.parameters())
    per_layer = (
        d * H * hd  # q_proj
        + 2 * d * kv * hd  # k_proj, v_proj
        + H * hd * d  # o_proj
        + 3 * d * f  # gate_proj, up_proj, down_proj
        + 2 * d  # input_layernorm, post_attention_layernorm
    )
    embeddings = 2 * V * d  # untied: the embedding and the head
    expected = embeddings + L * per_layer + d  # + final norm
    assert expected == 1_203_807_744
    assert model.num_parameters() == expected
    assert model.num_parameters(exclude_embeddings=True) == expected - embeddings


# -- decoding with a cache -------------------------------------------------------------------
def test_cached_decoding_equals_full_forward(model_arch, make_model):
    """Prefill, a multi-token chunk, then one token at a time through ContiguousKVCache gives the
    full forward's logits. For MLA this is the absorbed path against the expanded one."""
    model = make_model(model_arch, dtype=torch.float64)
    ids = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        full = model(ids)
        cache = ContiguousKVCache(model.kv_layout())
        outs, start = [], 0
        for n in (5, 3, 1, 1, 1, 1, 1):
            pos = torch.arange(start, start + n).expand(2, n)
            outs.append(model(ids[:, start : start + n], position_ids=pos, cache=cache))
            start += n
    assert max_diff(torch.cat(outs, dim=1), full) < TIGHT
    assert full.abs().max() > 0.5  # the logits are not trivially small

    layout = model.kv_layout()
    assert cache.length == 13
    assert cache.keys[0].shape == (2, 13, layout.n_kv_heads, layout.k_dim)
    stored = sum(k.numel() + (0 if v is None else v.numel()) for k, v in zip(cache.keys, cache.values))
    assert stored * 8 == layout.bytes_per_token(8) * 2 * 13
    if model.config.attn_type == "mla":  # only the latent and the shared rotary key are cached
        assert layout.k_dim == model.config.kv_lora_rank + model.config.qk_rope_head_dim
        assert all(v is None for v in cache.values)


def test_logits_index_selects_flattened_positions(make_model):
    model = make_model(dtype=torch.float64)
    ids = torch.randint(0, 97, (2, 6))
    index = torch.tensor([5, 11, 0])
    with torch.no_grad():
        assert max_diff(model(ids, logits_index=index), model(ids).reshape(-1, 97)[index]) < TIGHT


# -- packing and padding ---------------------------------------------------------------------
def test_packed_rows_equal_separate_forwards(model_arch, make_model):
    model = make_model(model_arch, dtype=torch.float64)
    rows = [[5, 7], [4, 3, 5]]  # sample lengths per row; both rows are 12 tokens
    samples = [[torch.randint(0, 97, (n,)) for n in row] for row in rows]
    ids = torch.stack([torch.cat(row) for row in samples])
    pos = torch.stack([torch.cat([torch.arange(len(s)) for s in row]) for row in samples])
    with torch.no_grad():
        packed = model(ids, position_ids=pos)
        for r, row in enumerate(samples):
            start = 0
            for s in row:
                alone = model(s[None])[0]
                assert max_diff(packed[r, start : start + len(s)], alone) < TIGHT
                start += len(s)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_equals_unpadded(model_arch, make_model, side):
    model = make_model(model_arch, dtype=torch.float64)
    short, long = torch.randint(1, 97, (6,)), torch.randint(1, 97, (9,))
    pad = torch.zeros(3, dtype=torch.long)
    padded = torch.cat([pad, short]) if side == "left" else torch.cat([short, pad])
    mask = torch.ones(2, 9, dtype=torch.long)
    if side == "left":
        mask[0, :3] = 0
    else:
        mask[0, 6:] = 0
    with torch.no_grad():
        out = model(torch.stack([padded, long]), attention_mask=mask)
        real = out[0, 3:] if side == "left" else out[0, :6]
        assert max_diff(real, model(short[None])[0]) < TIGHT
        assert max_diff(out[1], model(long[None])[0]) < TIGHT
        assert torch.isfinite(out).all()  # padding rows too: no NaN from fully masked softmax


# -- RoPE scalings against transformers ------------------------------------------------------
ROPE_CASES = {
    "linear": ({"rope_type": "linear", "factor": 4.0}, None),
    "dynamic-short": ({"rope_type": "dynamic", "factor": 2.0}, 3000),
    "dynamic-long": ({"rope_type": "dynamic", "factor": 2.0}, 10000),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}, None),
    "yarn-mscale": (
        {
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 1024,
            "mscale": 1.0,
            "mscale_all_dim": 0.8,
        },
        None,
    ),
    "yarn-attention-beta": (
        {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 1024,
            "attention_factor": 1.5,
            "beta_fast": 16.0,
            "beta_slow": 2.0,
        },
        None,
    ),
    "yarn-no-truncate": (
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "truncate": False},
        None,
    ),
    "llama3": (
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024,
        },
        None,
    ),
}


def _hf_rope(params: dict, theta: float, head_dim: int, max_len: int, seq_len):
    hf = LlamaConfig(
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=max_len,
        rope_parameters={**params, "rope_theta": theta},
    )
    return ROPE_INIT_FUNCTIONS[params["rope_type"]](hf, "cpu", seq_len)


@pytest.mark.parametrize("case", list(ROPE_CASES))
@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_scaling_matches_transformers(case, theta):
    params, seq_len = ROPE_CASES[case]
    ours_scaling = {("type" if k == "rope_type" else k): v for k, v in params.items()}
    config = ModelConfig(dim=256, n_heads=4, max_len=4096, rope_theta=theta, rope_scaling=ours_scaling)
    inv_freq, attention = rope_frequencies(config, seq_len)
    ref_inv_freq, ref_attention = _hf_rope(params, theta, 64, 4096, seq_len)
    torch.testing.assert_close(inv_freq, ref_inv_freq.float(), rtol=1e-6, atol=0)
    assert attention == pytest.approx(float(ref_attention), rel=1e-12)
    default, _ = rope_frequencies(ModelConfig(dim=256, n_heads=4, max_len=4096, rope_theta=theta))
    if case != "dynamic-short":
        assert not torch.allclose(inv_freq, default)  # the scaling really changed something


@pytest.mark.parametrize("key", ["type", "rope_type"])
def test_dynamic_rope_rescales_past_max_len(key):
    """Positions beyond max_len use frequencies recomputed for the current length."""
    config = ModelConfig(dim=64, n_heads=4, max_len=32, rope_scaling={key: "dynamic", "factor": 2.0})
    rotary = RotaryEmbedding(config)
    for length in (20, 100):
        pos = torch.arange(length)[None]
        cos, sin = rotary(pos, torch.float32)
        ref_inv_freq, _ = _hf_rope({"rope_type": "dynamic", "factor": 2.0}, 10000.0, 16, 32, length)
        angles = pos[0, :, None].float() * ref_inv_freq
        torch.testing.assert_close(cos[0], torch.cat([angles, angles], -1).cos())
        torch.testing.assert_close(sin[0], torch.cat([angles, angles], -1).sin())


def test_rope_frequencies_stay_float32_when_the_model_is_cast(make_model):
    model = make_model("qk_norm")
    exact = model.model.rotary.inv_freq.clone()
    far = torch.tensor([[3000]])
    cos32, _ = model.model.rotary(far, torch.float32)
    for dtype in (torch.bfloat16, torch.float16):
        model.to(dtype)
        assert model.model.rotary.inv_freq.dtype == torch.float32
        assert torch.equal(model.model.rotary.inv_freq, exact)
        cos, _ = model.model.rotary(far, torch.float32)
        assert torch.equal(cos, cos32)  # rounded frequencies would be off by whole radians here
        model.to(torch.float32)


# -- mixture of experts ----------------------------------------------------------------------
def _softmax64(logits: torch.Tensor) -> torch.Tensor:
    e = (logits - logits.max(-1, keepdim=True).values).exp()
    return e / e.sum(-1, keepdim=True)


def _top_k(probs: torch.Tensor, k: int) -> torch.Tensor:
    return torch.argsort(probs, dim=-1, descending=True)[:, :k]


def _swiglu(mlp, x):
    return (F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T


def test_moe_output_equals_routing_formula(make_model):
    moe = make_model("moe", dtype=torch.float64).model.layers[0].mlp
    x = torch.randn(7, 32, dtype=torch.float64)
    probs = _softmax64(x @ moe.gate.weight.T)
    chosen = _top_k(probs, moe.top_k)
    expected = _swiglu(moe.shared_experts, x)
    for t in range(x.shape[0]):
        w = probs[t, chosen[t]] / probs[t, chosen[t]].sum()
        for j, e in enumerate(chosen[t].tolist()):
            expected[t] += w[j] * _swiglu(moe.experts[e], x[t : t + 1])[0]
    with torch.no_grad():
        assert max_diff(moe(x), expected) < TIGHT


def test_moe_aux_loss_equals_switch_formula(make_model):
    model = make_model("moe", dtype=torch.float64, n_layers=3).train()
    inputs = []
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    hooks = [m.register_forward_hook(lambda mod, args, out: inputs.append(args[0].detach())) for m in moes]
    model(torch.randint(0, 97, (3, 10)))
    for h in hooks:
        h.remove()
    losses = []
    for moe, x in zip(moes, inputs):
        x = x.reshape(-1, x.shape[-1])
        probs = _softmax64(x @ moe.gate.weight.detach().T)
        chosen = _top_k(probs, moe.top_k)
        n_experts = probs.shape[1]
        share = torch.tensor([(chosen == e).sum().item() for e in range(n_experts)], dtype=torch.float64)
        share /= chosen.numel()  # fraction of routed slots that went to each expert
        losses.append(n_experts * (share * probs.mean(0)).sum())
    expected = model.config.moe_aux_loss_coef * sum(losses) / len(losses)
    aux = model.aux_loss()
    assert abs(aux.item() - expected.item()) < 1e-12
    assert aux.item() > model.config.moe_aux_loss_coef * 0.99  # >= coef; equality only for uniform routing
    aux.backward()
    assert moes[0].gate.weight.grad.abs().sum() > 0  # it trains the router


def test_moe_aux_loss_leaves_padding_out(make_model):
    """A padded batch's balance loss is the formula over its real tokens: what the padding ids
    are must not change it, and the real tokens' routing is the unpadded batch's."""
    model = make_model("moe", dtype=torch.float64).train()
    ids = torch.randint(1, 97, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0  # row 1: 5 tokens, right-padded
    inputs = []
    moe = model.model.layers[0].mlp
    hook = moe.register_forward_hook(lambda mod, args, out: inputs.append(args[0].detach()))
    model(ids, attention_mask=mask)
    first_layer = moe.aux_loss.item()
    other_padding = ids.clone()
    other_padding[1, 5:] = torch.randint(1, 97, (3,))
    model(other_padding, attention_mask=mask)
    hook.remove()
    assert abs(moe.aux_loss.item() - first_layer) < 1e-12
    x = inputs[0].reshape(-1, inputs[0].shape[-1])[mask.reshape(-1).bool()]  # the 13 real tokens
    probs = _softmax64(x @ moe.gate.weight.detach().T)
    chosen = _top_k(probs, moe.top_k)
    share = torch.tensor([(chosen == e).sum().item() for e in range(probs.shape[1])], dtype=torch.float64)
    expected = probs.shape[1] * (share / chosen.numel() * probs.mean(0)).sum()
    assert abs(first_layer - expected.item()) < 1e-12


# -- training helpers ------------------------------------------------------------------------
def test_gradient_checkpointing_gives_the_same_gradients(model_arch, make_model):
    model = make_model(model_arch, dtype=torch.float64).train()
    ids, targets = torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (2, 9))
    calls = []
    # a pre-hook: recomputation stops early, before a forward hook would run
    model.model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))

    def gradients(enabled: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        model.enable_gradient_checkpointing(enabled)
        calls.clear()
        logits = model(ids)
        loss = F.cross_entropy(logits.reshape(-1, 97), targets.reshape(-1)) + model.aux_loss()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = gradients(False)
    plain_calls = len(calls)
    checkpointed = gradients(True)
    assert len(calls) == 2 * plain_calls  # the layer really was recomputed in backward
    for name, grad in plain.items():
        assert max_diff(checkpointed[name], grad) < 1e-12, name


def test_init_scales_residual_output_projections():
    config = ModelConfig(
        vocab_size=1000, dim=256, n_layers=8, n_heads=4, ffn_dim=512, init_std=0.02, attn_bias=True, qk_norm=True
    )
    model = CausalLM(config)
    out_std = 0.02 / math.sqrt(2 * 8)
    for name, p in model.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            assert p.std().item() == pytest.approx(out_std, rel=0.03), name
        elif name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:
            assert p.std().item() == pytest.approx(0.02, rel=0.03), name


def test_init_scales_mla_and_expert_outputs(tiny_config):
    config = tiny_config(
        "mla",
        dim=128,
        n_layers=4,
        init_std=0.02,
        ffn_type="moe",
        n_routed_experts=2,
        moe_ffn_dim=128,
        n_shared_experts=1,
    )
    model = CausalLM(config)
    out_std = 0.02 / math.sqrt(2 * 4)
    scaled = [n for n, _ in model.named_parameters() if n.endswith(("o_proj.weight", "down_proj.weight"))]
    assert any(".experts." in n for n in scaled) and any("shared_experts" in n for n in scaled)
    for name, p in model.named_parameters():
        if name in scaled:
            assert p.std().item() == pytest.approx(out_std, rel=0.05), name
