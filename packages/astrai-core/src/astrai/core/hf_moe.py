"""Mixtral and Qwen2-MoE directories: their config.json fields and tensor names, to and from ours.

Why a module of its own: these families differ from Llama / Qwen2 only in the feed-forward
block, so hf_config.py maps attention, norms and RoPE as for the dense families and calls
this module for the router, the experts and (Qwen2-MoE) the sigmoid-gated shared expert and
the layers that stay dense. On disk both keep one tensor per expert (transformers 5 fuses
them in memory and splits them again when it saves); Mixtral names its block
`block_sparse_moe` and its expert projections w1 (gate), w3 (up) and w2 (down).

What our ModelConfig cannot express raises ConfigError naming the config.json field;
hf_config.py reports it as an HFConfigError. This module imports nothing of hf_config.py.
"""

from __future__ import annotations

import re
from typing import Any

from .config import ConfigError, ModelConfig
from .rope import rope_kind

MOE_ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}

# What transformers assumes when a field is absent from config.json (its config class defaults).
MOE_DEFAULTS = {
    "mixtral": {
        "max_position_embeddings": 4096 * 32,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "router_aux_loss_coef": 0.001,
    },
    "qwen2_moe": {
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "qkv_bias": True,
        "router_aux_loss_coef": 0.001,
    },
}
# num_key_value_heads when config.json leaves it out (null means: as many as the query heads).
_DEFAULT_KV_HEADS = {"mixtral": 8, "qwen2_moe": 16}


def _refuse(bad: bool, field: str, detail: str) -> None:
    if bad:
        raise ConfigError(f"field {field!r} is {detail}")


# -- ModelConfig -> config.json -----------------------------------------------------------------
def moe_model_type(config: ModelConfig) -> str | None:
    """The transformers MoE model_type that runs this architecture exactly, or None."""
    if config.ffn_type != "moe" or config.attn_type != "gqa" or config.gated_attn or config.qk_norm:
        return None
    if config.has_gemma2_features:  # windows, soft-caps, extra norms: no MoE family has them
        return None
    if rope_kind(config) == "ntk":  # static NTK: transformers has no such rope_type
        return None
    plain_router = config.moe_norm_topk and not config.moe_dense_layers
    if not config.n_shared_experts and not config.attn_bias and plain_router:
        return "mixtral"
    # Qwen2-MoE always has one gated shared expert; its attention reads head_dim from the width.
    if config.n_shared_experts and config.moe_shared_gate and config.head_dim * config.n_heads == config.dim:
        return "qwen2_moe"
    return None


def to_hf_moe_fields(model_type: str, config: ModelConfig) -> dict[str, Any]:
    """The family's own config.json fields, on top of the dense ones (hf_config._hf_fields)."""
    common = {
        "num_experts_per_tok": config.n_activated_experts,
        "router_aux_loss_coef": config.moe_aux_loss_coef,
        "output_router_logits": False,
    }
    if model_type == "mixtral":
        return {
            **common,
            "intermediate_size": config.moe_ffn_dim,
            "num_local_experts": config.n_routed_experts,
            "sliding_window": None,
            "router_jitter_noise": 0.0,
        }
    return {
        **common,
        "intermediate_size": config.ffn_dim,  # the dense layers' MLP
        "num_experts": config.n_routed_experts,
        "moe_intermediate_size": config.moe_ffn_dim,
        "shared_expert_intermediate_size": config.shared_ffn_dim,
        "norm_topk_prob": config.moe_norm_topk,
        "decoder_sparse_step": 1,
        "mlp_only_layers": sorted(config.moe_dense_layers),
        "qkv_bias": config.attn_bias,
        "use_sliding_window": False,
    }


# -- config.json -> ModelConfig -----------------------------------------------------------------
def from_hf_moe_fields(model_type: str, data: dict[str, Any], d: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields of the MoE block (and what differs from the dense mapping).

    data: config.json as read; d: the same with MOE_DEFAULTS filled in and nulls dropped."""
    heads = d["num_attention_heads"]
    fields = {"n_kv_heads": data.get("num_key_value_heads", _DEFAULT_KV_HEADS[model_type]) or heads}
    if model_type == "mixtral":
        return {**fields, **_mixtral_fields(d)}
    return {**fields, **_qwen2_moe_fields(d)}


def _mixtral_fields(d: dict[str, Any]) -> dict[str, Any]:
    window, max_len = d.get("sliding_window"), d["max_position_embeddings"]
    _refuse(
        window is not None and window < max_len,
        "sliding_window",
        f"{window}, below max_position_embeddings ({max_len}): sliding-window attention is not supported "
        "(null or a window >= max_position_embeddings loads)",
    )
    jitter = d.get("router_jitter_noise") or 0.0
    _refuse(jitter != 0.0, "router_jitter_noise", f"{jitter} (router jitter while training is not supported; use 0.0)")
    return {
        "ffn_type": "moe",
        "n_routed_experts": d["num_local_experts"],
        "n_activated_experts": d["num_experts_per_tok"],
        "n_shared_experts": 0,
        "moe_shared_ffn_dim": None,
        "moe_shared_gate": False,
        "moe_dense_layers": [],
        "moe_ffn_dim": d["intermediate_size"],
        "moe_norm_topk": True,  # softmax over the chosen experts' logits
        "moe_aux_loss_coef": d["router_aux_loss_coef"],
        "attn_bias": False,
    }


def _qwen2_moe_fields(d: dict[str, Any]) -> dict[str, Any]:
    attention = {"attn_bias": bool(d["qkv_bias"])}
    dense = _qwen2_moe_dense_layers(d)
    if d["num_experts"] == 0 or len(dense) == d["num_hidden_layers"]:
        return {**attention, "ffn_type": "mlp"}  # no sparse layer at all: a Qwen2 under another name
    shared = d["shared_expert_intermediate_size"]
    _refuse(
        not isinstance(shared, int) or shared <= 0,
        "shared_expert_intermediate_size",
        f"{shared!r} (the shared expert must have a positive width)",
    )
    return {
        **attention,
        "ffn_type": "moe",
        "n_routed_experts": d["num_experts"],
        "n_activated_experts": d["num_experts_per_tok"],
        "n_shared_experts": 1,
        "moe_shared_ffn_dim": shared,
        "moe_shared_gate": True,
        "moe_ffn_dim": d["moe_intermediate_size"],
        "moe_norm_topk": bool(d["norm_topk_prob"]),
        "moe_dense_layers": dense,
        "moe_aux_loss_coef": d["router_aux_loss_coef"],
    }


def _qwen2_moe_dense_layers(d: dict[str, Any]) -> list[int]:
    """Layers with a dense MLP: those in mlp_only_layers and those off the decoder_sparse_step grid."""
    step, only = d["decoder_sparse_step"], d.get("mlp_only_layers") or []
    _refuse(not isinstance(step, int) or step < 1, "decoder_sparse_step", f"{step!r} (must be a positive integer)")
    _refuse(
        not isinstance(only, list) or not all(isinstance(i, int) for i in only),
        "mlp_only_layers",
        f"{only!r} (must be a list of layer indices)",
    )
    return [i for i in range(d["num_hidden_layers"]) if i in only or (i + 1) % step != 0]


# -- tensor names -------------------------------------------------------------------------------
_MIXTRAL_EXPERT = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
_OUR_MOE = re.compile(r"(model\.layers\.\d+)\.mlp\.(.+)")
_OUR_EXPERT = re.compile(r"experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def to_hf_moe_name(name: str, model_type: str) -> str:
    """The family's on-disk name for our tensor `name`; the inverse is looked up by the loader."""
    m = _OUR_MOE.fullmatch(name)
    if m is None:
        return name
    layer, rest = m.groups()
    if model_type == "qwen2_moe":
        return f"{layer}.mlp.{rest.replace('shared_experts.', 'shared_expert.', 1)}"
    expert = _OUR_EXPERT.fullmatch(rest)
    if expert:
        rest = f"experts.{expert.group(1)}.{_MIXTRAL_EXPERT[expert.group(2)]}.weight"
    return f"{layer}.block_sparse_moe.{rest}"
