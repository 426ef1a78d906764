"""Mixtral and Qwen2-MoE directories, checked against transformers itself (float32, logits within 1e-4).

Each family (Qwen2-MoE with normalised and with plain top-k weights, and with dense layers from
decoder_sparse_step / mlp_only_layers) is built as a random small model by transformers' own
class and saved by it; our AutoModel loads the directory with equal logits, our engine's greedy
output equals transformers' generate, and our save_pretrained writes a directory transformers
loads back as the same class with equal logits. What our config cannot express fails at load
naming the config.json field.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from hf_helpers import ATOL, assert_engine_greedy_equals_generate

from astrai.core.auto import AutoModel
from astrai.core.checkpoint import CheckpointError, save_pretrained
from astrai.core.config import ModelConfig
from astrai.core.hf_config import HFConfigError, from_hf_dict, to_hf_dict
from astrai.core.transformer import CausalLM

VOCAB = 128
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    num_experts_per_tok=2,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
QWEN2_MOE = dict(
    TINY, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=40, num_experts=4
)
FAMILIES = {
    "mixtral": lambda: transformers.MixtralConfig(
        **TINY, intermediate_size=48, num_local_experts=4, rope_parameters={"rope_type": "default", "rope_theta": 1e6}
    ),
    "mixtral-tied-yarn": lambda: transformers.MixtralConfig(
        **TINY,
        intermediate_size=48,
        num_local_experts=4,
        head_dim=16,  # MixtralConfig leaves it None, which transformers' YaRN cannot read
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 32},
    ),
    "qwen2_moe-norm_topk": lambda: transformers.Qwen2MoeConfig(**QWEN2_MOE, norm_topk_prob=True),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**QWEN2_MOE, norm_topk_prob=False),
    # 4 layers, sparse every 2nd, layer 3 forced dense: only layer 1 routes; no q/k/v bias.
    "qwen2_moe-dense_layers-no_bias": lambda: transformers.Qwen2MoeConfig(
        **{**QWEN2_MOE, "num_hidden_layers": 4}, decoder_sparse_step=2, mlp_only_layers=[3], qkv_bias=False
    ),
}
ARCHITECTURE = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Every weight random (router and shared-expert gate included) and O(1) logits; norms near 1."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
    return model.eval()


def transformers_directory(kind: str, path, **save_kw) -> torch.nn.Module:
    theirs = randomize(transformers.AutoModelForCausalLM.from_config(FAMILIES[kind]()))
    theirs.save_pretrained(path, **save_kw)
    return theirs


def batches():
    """A padding-free batch, and a left-padded one with its attention mask and position ids."""
    ids = torch.randint(3, VOCAB, (3, 20))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    mask[1, :2] = 0
    padded = ids.masked_fill(mask == 0, 0)
    return ids, (padded, mask, (mask.cumsum(-1) - 1).clamp(min=0))


def assert_same_logits(ours, theirs):
    ids, (padded, mask, pos) = batches()
    with torch.no_grad():
        a, b = ours(ids), theirs(input_ids=ids).logits
        assert b.abs().max() > 1.0  # meaningful logits
        assert (a - b).abs().max().item() < ATOL
        a = ours(padded, position_ids=pos, attention_mask=mask)
        b = theirs(input_ids=padded, position_ids=pos, attention_mask=mask).logits
        real = mask.bool()
        assert (a[real] - b[real]).abs().max().item() < ATOL


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_a_transformers_moe_directory_loads_into_our_model_with_equal_logits(tmp_path, kind):
    theirs = transformers_directory(kind, tmp_path, max_shard_size="100KB")  # sharded, transformers' index
    ours = AutoModel.from_pretrained(tmp_path, dtype=torch.float32)
    c = ours.config
    assert (c.ffn_type, c.n_routed_experts, c.n_activated_experts) == ("moe", 4, 2)
    if kind.startswith("mixtral"):
        assert (c.n_shared_experts, c.moe_norm_topk, c.moe_ffn_dim, c.attn_bias) == (0, True, 48, False)
        assert c.tie_embeddings == kind.endswith("tied-yarn")
    else:
        assert (c.shared_ffn_dim, c.moe_shared_gate, c.moe_ffn_dim, c.ffn_dim) == (40, True, 32, 96)
        assert c.moe_norm_topk == kind.endswith("norm_topk")
        assert c.attn_bias == (not kind.endswith("no_bias"))
        assert c.moe_dense_layers == ([0, 2, 3] if "dense_layers" in kind else [])
    assert_same_logits(ours, theirs)


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_greedy_output_of_our_engine_equals_transformers_generate(tmp_path, kind):
    theirs = transformers_directory(kind, tmp_path)
    ours = AutoModel.from_pretrained(tmp_path, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 13, 21)]
    assert_engine_greedy_equals_generate(ours, theirs, prompts, num_pages=24)


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_our_export_loads_into_transformers_as_the_same_class_with_equal_logits(tmp_path, kind):
    transformers_directory(kind, tmp_path / "theirs")
    ours = AutoModel.from_pretrained(tmp_path / "theirs", dtype=torch.float32)
    save_pretrained(ours, tmp_path / "ours")
    data = json.loads((tmp_path / "ours" / "config.json").read_text())
    family = kind.split("-")[0]
    assert (data["model_type"], data["architectures"]) == (family, [ARCHITECTURE[family]])
    back, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ours", dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(back).__name__ == ARCHITECTURE[family]
    assert_same_logits(ours, back.eval())
    # our reload is exact, and transformers' re-save keeps our full config under "astrai"
    assert AutoModel.from_pretrained(tmp_path / "ours").config == ours.config
    back.save_pretrained(tmp_path / "again")
    assert AutoModel.from_pretrained(tmp_path / "again").config == ours.config


def test_our_moe_built_from_scratch_exports_as_mixtral_or_qwen2_moe_only_when_exact(tiny_config):
    moe = dict(ffn_type="moe", n_routed_experts=4, n_activated_experts=2, moe_ffn_dim=24)
    assert to_hf_dict(tiny_config(**moe, n_shared_experts=0))["model_type"] == "mixtral"
    qwen = tiny_config(**moe, n_shared_experts=1, moe_shared_gate=True, attn_bias=True, moe_norm_topk=False)
    assert to_hf_dict(qwen)["model_type"] == "qwen2_moe"
    assert from_hf_dict(json.loads(json.dumps(to_hf_dict(qwen)))) == qwen
    # no HF family: an ungated shared expert, plain top-k without a shared expert, qk-norm, dense layers in Mixtral
    for fields in (
        dict(n_shared_experts=1),
        dict(n_shared_experts=0, moe_norm_topk=False),
        dict(n_shared_experts=0, qk_norm=True),
        dict(n_shared_experts=0, moe_dense_layers=[1]),
    ):
        assert to_hf_dict(tiny_config(**{**moe, **fields}))["model_type"] == "astrai"


def test_dense_layers_and_the_shared_gate_train_with_a_padding_mask(tiny_config):
    """An MoE model with a dense layer runs the masked training forward (the balance loss skips padding)."""
    config = tiny_config(ffn_type="moe", n_routed_experts=4, moe_ffn_dim=24, moe_shared_gate=True, moe_dense_layers=[0])
    model = CausalLM(config).train()
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    loss = model(torch.randint(0, config.vocab_size, (2, 6)), attention_mask=mask).sum() + model.aux_loss()
    loss.backward()
    assert model.model.layers[1].mlp.shared_expert_gate.weight.grad.abs().sum() > 0


# config.json files as published on the Hugging Face Hub (transformers 4.x layout).
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mixtral",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1e6,
    "router_aux_loss_coef": 0.02,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}
QWEN15_MOE_A27B = {
    "architectures": ["Qwen2MoeForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 5632,
    "max_position_embeddings": 8192,
    "max_window_layers": 21,
    "model_type": "qwen2_moe",
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "num_key_value_heads": 16,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.39.0.dev0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
    "decoder_sparse_step": 1,
    "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632,
    "num_experts_per_tok": 4,
    "num_experts": 60,
    "norm_topk_prob": False,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
}


@pytest.mark.parametrize(
    "published, n_params",
    [(MIXTRAL_8X7B, 46_702_792_704), (QWEN15_MOE_A27B, 14_315_784_192)],
    ids=["mixtral-8x7b", "qwen1.5-moe-a2.7b"],
)
def test_published_configs_map_to_the_published_parameter_counts(published, n_params):
    config = from_hf_dict(published)
    with torch.device("meta"):
        assert CausalLM(config).num_parameters() == n_params  # Mixtral 8x7B: 46.7B, Qwen1.5-MoE-A2.7B: 14.3B
    assert config.rope_theta == 1e6 and config.max_len == published["max_position_embeddings"]


@pytest.mark.parametrize(
    "edit, field",
    [
        ({"sliding_window": 4096}, "sliding_window"),
        ({"router_jitter_noise": 0.01}, "router_jitter_noise"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_what_a_mixtral_config_cannot_express_fails_naming_the_field(edit, field):
    with pytest.raises(HFConfigError, match=f"'{field}'"):
        from_hf_dict({**MIXTRAL_8X7B, **edit})


def test_a_mixtral_sliding_window_as_long_as_the_context_loads():
    assert from_hf_dict({**MIXTRAL_8X7B, "sliding_window": 32768}).max_len == 32768
    assert from_hf_dict({**MIXTRAL_8X7B, "sliding_window": None}).max_len == 32768


@pytest.mark.parametrize(
    "edit, field",
    [
        ({"use_sliding_window": True, "layer_types": ["sliding_attention"] * 24}, "use_sliding_window"),
        ({"decoder_sparse_step": 0}, "decoder_sparse_step"),
        ({"mlp_only_layers": "all"}, "mlp_only_layers"),
        ({"shared_expert_intermediate_size": 0}, "shared_expert_intermediate_size"),
    ],
)
def test_what_a_qwen2_moe_config_cannot_express_fails_naming_the_field(edit, field):
    with pytest.raises(HFConfigError, match=f"'{field}'"):
        from_hf_dict({**QWEN15_MOE_A27B, **edit})


def test_qwen2_moe_sparse_step_and_mlp_only_layers_become_dense_layers():
    config = from_hf_dict({**QWEN15_MOE_A27B, "decoder_sparse_step": 3, "mlp_only_layers": [2, 5, 99]})
    assert [i for i in range(24) if config.is_moe_layer(i)] == [
        i for i in range(24) if (i + 1) % 3 == 0 and i not in (2, 5)
    ]


def test_a_refused_directory_fails_at_load_naming_the_field(tmp_path):
    transformers_directory("mixtral", tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**data, "sliding_window": 16}))
    with pytest.raises(CheckpointError, match="'sliding_window' is 16"):
        AutoModel.from_pretrained(tmp_path)


def test_new_moe_fields_are_validated():
    with pytest.raises(ValueError, match="moe_shared_gate"):
        ModelConfig(ffn_type="moe", n_shared_experts=0, moe_shared_gate=True)
    with pytest.raises(ValueError, match="moe_dense_layers"):
        ModelConfig(ffn_type="moe", n_layers=2, moe_dense_layers=[2])
    with pytest.raises(ValueError, match="moe_shared_ffn_dim"):
        ModelConfig(ffn_type="moe", n_shared_experts=0, moe_shared_ffn_dim=64)
