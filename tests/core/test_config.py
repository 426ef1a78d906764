"""ModelConfig: JSON round trip, validation messages, and the shipped configs in configs/model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from astrai.core.config import ConfigError, ModelConfig
from astrai.core.hf_config import hf_model_type
from astrai.core.transformer import CausalLM

MODEL_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"


def test_json_round_trip_keeps_every_field(tmp_path):
    config = ModelConfig(
        vocab_size=300,
        dim=48,
        n_layers=3,
        n_heads=6,
        n_kv_heads=2,
        head_dim=16,
        ffn_dim=80,
        norm_eps=1e-5,
        max_len=256,
        rope_theta=5e5,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
        tie_embeddings=True,
        attn_bias=True,
        gated_attn=True,
        attn_type="mla",
        q_lora_rank=24,
        kv_lora_rank=20,
        qk_nope_head_dim=8,
        qk_rope_head_dim=6,
        v_head_dim=10,
        ffn_type="moe",
        n_routed_experts=5,
        n_shared_experts=2,
        n_activated_experts=3,
        moe_ffn_dim=40,
        moe_aux_loss_coef=0.05,
        init_std=0.01,
        bos_token_id=1,
        eos_token_id=[2, 4],
        pad_token_id=0,
        extra={"note": "中文 ok", "nested": {"a": [1, 2]}},
    )
    assert ModelConfig.from_json(config.to_json()) == config
    config.to_json(tmp_path / "c.json")
    again = ModelConfig.from_json(tmp_path / "c.json")
    assert again == config
    assert again.to_dict() == config.to_dict()
    assert "中文" in (tmp_path / "c.json").read_text(encoding="utf-8")  # written as UTF-8, not escaped


def test_derived_defaults():
    c = ModelConfig(dim=96, n_heads=6)
    assert (c.n_kv_heads, c.head_dim, c.moe_ffn_dim) == (6, 16, c.ffn_dim)
    assert c.ffn_dim == 256 and c.ffn_dim % 64 == 0  # 8/3 * 96 = 256


BAD_VALUES = [
    ({"vocab_size": 0}, "vocab_size"),
    ({"vocab_size": 10.5}, "vocab_size"),
    ({"dim": -8}, "dim"),
    ({"n_layers": 0}, "n_layers"),
    ({"n_heads": 0}, "n_heads"),
    ({"n_kv_heads": 0}, "n_kv_heads"),
    ({"n_heads": 4, "n_kv_heads": 3}, "n_kv_heads"),
    ({"ffn_dim": 0}, "ffn_dim"),
    ({"max_len": 0}, "max_len"),
    ({"dim": 30, "n_heads": 4}, "head_dim"),  # not divisible: head_dim must be given
    ({"dim": 60, "n_heads": 4}, "head_dim"),  # head_dim 15 is odd: no rotary pairs
    ({"norm_eps": 0.0}, "norm_eps"),
    ({"rope_theta": -1.0}, "rope_theta"),
    ({"attn_type": "mha"}, "attn_type"),
    ({"ffn_type": "glu"}, "ffn_type"),
    ({"attn_type": "mla", "kv_lora_rank": 0}, "kv_lora_rank"),
    ({"attn_type": "mla", "qk_rope_head_dim": 7}, "qk_rope_head_dim"),
    ({"attn_type": "mla", "qk_norm": True}, "qk_norm"),
    ({"ffn_type": "moe", "n_routed_experts": 0}, "n_routed_experts"),
    ({"ffn_type": "moe", "n_routed_experts": 4, "n_activated_experts": 5}, "n_activated_experts"),
    ({"ffn_type": "moe", "n_shared_experts": -1}, "n_shared_experts"),
    ({"rope_scaling": "linear"}, "rope_scaling"),
    ({"rope_scaling": {"type": "ntk-by-parts", "factor": 2.0}}, "rope_scaling.type"),
    ({"rope_scaling": {"type": "linear", "factor": 0.5}}, "rope_scaling.factor"),
    ({"rope_scaling": {"rope_type": "linear"}}, "rope_scaling.factor"),
    (
        {
            "rope_scaling": {
                "type": "llama3",
                "factor": 8.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
        "rope_scaling.low_freq_factor",
    ),
]


@pytest.mark.parametrize(("overrides", "field"), BAD_VALUES, ids=[f for _, f in BAD_VALUES])
def test_validation_error_names_the_field(overrides, field):
    fields = {"dim": 32, "n_heads": 4, **overrides}
    with pytest.raises(ConfigError) as err:
        ModelConfig(**fields)
    message = str(err.value)
    assert f"ModelConfig.{field} " in message
    assert len(message) < 300  # one readable line, not a dump


def test_from_dict_rejects_unknown_fields_by_name():
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelConfig.from_dict({"dim": 32, "n_heads": 4, "hidden_size": 32})


def test_from_json_reports_bad_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"dim": 32,', encoding="utf-8")
    with pytest.raises(ConfigError, match="bad.json is not valid JSON"):
        ModelConfig.from_json(path)


# -- shipped configs ------------------------------------------------------------------------
SHIPPED = {
    # file: (Hugging Face model_type it saves as, parameter count)
    "tiny.json": ("llama", 1_049_728),
    "tiny-mla-moe.json": (None, 1_775_104),
    "astrai-1b.json": ("llama", 1_203_807_744),  # upstream AstrAI's released 1B shape
    "qwen2.5-0.5b.json": ("qwen2", 494_032_768),  # the published Qwen2.5-0.5B count
    "qwen3-0.6b.json": ("qwen3", 596_049_920),  # the published Qwen3-0.6B count
    "tinyllama-1.1b.json": ("llama", 1_100_048_384),  # the published TinyLlama-1.1B count
}


def test_configs_directory_holds_the_shipped_set():
    assert {p.name for p in MODEL_CONFIGS.glob("*.json")} >= set(SHIPPED)


@pytest.mark.parametrize("path", sorted(MODEL_CONFIGS.glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_builds(path):
    config = ModelConfig.from_json(path)
    assert json.loads(path.read_text(encoding="utf-8")).keys() <= config.to_dict().keys()
    with torch.device("meta"):
        model = CausalLM(config)
    if path.name in SHIPPED:
        model_type, n_params = SHIPPED[path.name]
        assert hf_model_type(config) == model_type
        assert model.num_parameters() == n_params


def test_named_open_shapes():
    q25 = ModelConfig.from_json(MODEL_CONFIGS / "qwen2.5-0.5b.json")
    assert (q25.vocab_size, q25.dim, q25.n_layers, q25.n_heads, q25.n_kv_heads, q25.ffn_dim) == (
        151936,
        896,
        24,
        14,
        2,
        4864,
    )
    assert q25.tie_embeddings and q25.attn_bias and q25.rope_theta == 1e6
    q3 = ModelConfig.from_json(MODEL_CONFIGS / "qwen3-0.6b.json")
    assert (q3.dim, q3.n_layers, q3.n_heads, q3.n_kv_heads, q3.head_dim, q3.ffn_dim, q3.max_len) == (
        1024,
        28,
        16,
        8,
        128,
        3072,
        40960,
    )
    assert q3.qk_norm and q3.tie_embeddings and not q3.attn_bias
    tl = ModelConfig.from_json(MODEL_CONFIGS / "tinyllama-1.1b.json")
    assert (tl.vocab_size, tl.dim, tl.n_layers, tl.n_heads, tl.n_kv_heads, tl.ffn_dim, tl.max_len) == (
        32000,
        2048,
        22,
        32,
        4,
        5632,
        2048,
    )
    assert not tl.tie_embeddings and tl.rope_theta == 10000.0
    tiny = ModelConfig.from_json(MODEL_CONFIGS / "tiny.json")
    assert (tiny.dim, tiny.n_layers, tiny.n_heads, tiny.n_kv_heads, tiny.max_len) == (128, 4, 4, 2, 512)
    mla_moe = ModelConfig.from_json(MODEL_CONFIGS / "tiny-mla-moe.json")
    assert (mla_moe.attn_type, mla_moe.ffn_type) == ("mla", "moe")
