"""config.json in the Hugging Face layout, mapped to and from ModelConfig.

A model that transformers can run as Llama, Qwen2, Qwen3, Mistral, Phi-3, Gemma or Gemma 2 is written as
that model's config so `transformers.AutoModelForCausalLM` loads our directories unchanged; our
full config rides along under the "astrai" key so nothing is lost. Anything else (MLA, gated
attention) is written as model_type "astrai" with our own field names. What Mistral, Phi-3,
Gemma and Gemma 2 add to Llama lives in hf_families.py; Mixtral and Qwen2-MoE are mapped the same way,
their MoE block by hf_moe.py.
"""

from __future__ import annotations

from typing import Any

from .config import ConfigError, ModelConfig
from .errors import AstraiError
from .hf_families import (
    FAMILY_ARCHITECTURES,
    FAMILY_DEFAULTS,
    FamilyError,
    family_fields,
    family_for,
    family_hf_fields,
)
from .hf_moe import MOE_ARCHITECTURES, MOE_DEFAULTS, from_hf_moe_fields, moe_model_type, to_hf_moe_fields
from .rope import rope_kind

ASTRAI_MODEL_TYPE = "astrai"
ASTRAI_ARCHITECTURE = "AstrAIForCausalLM"
HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    **FAMILY_ARCHITECTURES,
}
SUPPORTED_ARCHITECTURES = sorted([ASTRAI_ARCHITECTURE, *HF_ARCHITECTURES.values(), *MOE_ARCHITECTURES.values()])

# Bookkeeping keys that carry no architecture; ignored when reading an "astrai" config.
_META_KEYS = {"model_type", "architectures", "dtype", "torch_dtype", "transformers_version", "_name_or_path"}

# What transformers assumes when a field is absent from config.json (its config class defaults).
_HF_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2, "rms_norm_eps": 1e-6},
    "qwen2": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6},
    "qwen3": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6},
    **FAMILY_DEFAULTS,
}
# Fields whose null means something else than absent (absent: the default; null: none / derived).
_NULLABLE = {"sliding_window", "num_key_value_heads", "attn_logit_softcapping", "final_logit_softcapping"}


class HFConfigError(AstraiError):
    """config.json describes something we cannot build; the message says what and why."""


def hf_model_type(config: ModelConfig) -> str | None:
    """The transformers model_type that runs this architecture exactly, or None."""
    if config.attn_type != "gqa" or config.ffn_type != "mlp" or config.gated_attn or config.qk_norm_after_rope:
        return None
    if rope_kind(config) == "ntk":  # static NTK: transformers has no such rope_type
        return None
    family = family_for(config)  # Mistral, Phi-3, Gemma, Gemma 2
    if family is not None or config.has_gemma2_features:
        return family
    if config.mlp_act != "silu" or config.scale_embeddings:
        return None
    if config.qk_norm and not config.attn_bias:
        return "qwen3"
    if config.attn_bias and not config.qk_norm:
        return "qwen2"  # bias on q/k/v only; Llama's and Qwen3's attention_bias also covers o_proj
    if not config.attn_bias and not config.qk_norm and config.dim % config.n_heads == 0:
        return "llama"  # transformers' LlamaConfig insists on hidden_size % heads == 0
    return None


def to_hf_dict(config: ModelConfig, dtype: str | None = None) -> dict[str, Any]:
    """The config.json contents for `config`; dtype is the name of the stored weights' dtype."""
    model_type = hf_model_type(config)
    if moe_model_type(config) is not None:
        out = _to_moe_dict(config)
    elif model_type is None:
        out = {"model_type": ASTRAI_MODEL_TYPE, "architectures": [ASTRAI_ARCHITECTURE], **config.to_dict()}
    else:
        out = {"model_type": model_type, "architectures": [HF_ARCHITECTURES[model_type]]}
        out.update(_hf_fields(config, model_type))
        if model_type in ("llama", "qwen3"):
            out["attention_bias"] = False
        if model_type == "llama":
            out["mlp_bias"] = False
        elif model_type in ("qwen2", "qwen3"):
            out["use_sliding_window"] = False
        out["astrai"] = config.to_dict()
    if dtype is not None:
        out["dtype"] = dtype
    return out


def _hf_fields(config: ModelConfig, model_type: str) -> dict[str, Any]:
    fields = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "max_position_embeddings": config.max_len,
        "rope_parameters": _rope_parameters(config),
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "use_cache": True,
    }
    return family_hf_fields(model_type, config, fields)


def _rope_parameters(config: ModelConfig) -> dict[str, Any]:
    """transformers 5.x keeps rope_theta and the scaling together in one `rope_parameters` dict."""
    scaling = dict(config.rope_scaling or {})
    kind = scaling.pop("type", None) or scaling.pop("rope_type", None) or "default"
    scaling.pop("rope_type", None)
    return {"rope_type": kind, "rope_theta": float(config.rope_theta), **scaling}


def from_hf_dict(data: dict[str, Any]) -> ModelConfig:
    """ModelConfig from config.json contents written by us or by transformers (4.x or 5.x)."""
    model_type = data.get("model_type")
    if model_type == ASTRAI_MODEL_TYPE:
        return _model_config({k: v for k, v in data.items() if k not in _META_KEYS})
    if model_type in MOE_ARCHITECTURES:
        return _from_moe_dict(model_type, data)
    if model_type not in HF_ARCHITECTURES:
        archs = data.get("architectures") or []
        raise HFConfigError(
            f"architecture {', '.join(archs) or '(none)'} (model_type {model_type!r}) is not supported; "
            f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    _check_architectures(model_type, data, HF_ARCHITECTURES[model_type])
    return _with_saved_copy(data, _from_hf_fields(model_type, data), lambda config: _hf_fields(config, model_type))


def _check_architectures(model_type: str, data: dict[str, Any], architecture: str) -> None:
    archs = data.get("architectures") or [architecture]
    if architecture not in archs:
        raise HFConfigError(
            f"architectures {archs} is not a causal LM for model_type {model_type!r}; "
            f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def _with_saved_copy(data: dict[str, Any], mapped: dict[str, Any], hf_fields) -> ModelConfig:
    """The config under our "astrai" key when the Hugging Face fields still say what it says
    (hf_fields(config) writes them), else the mapped fields over it, else the mapped fields."""
    ours = data.get("astrai")
    if isinstance(ours, dict):
        saved = _model_config(ours)
        # Our own copy is exact; use it unless a tool edited the Hugging Face fields since.
        if all(
            data.get(k) == v for k, v in hf_fields(saved).items() if k not in ("rope_parameters", "use_cache")
        ) and _same_rope(data, saved):
            return saved
        return _model_config({**ours, **mapped})
    return _model_config(mapped)


def _from_hf_fields(model_type: str, data: dict[str, Any], defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    defaults = _HF_DEFAULTS[model_type] if defaults is None else defaults
    given = {k: v for k, v in data.items() if v is not None or k.endswith("_token_id") or k in _NULLABLE}
    d = {**defaults, **given}
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in d:
            architecture = HF_ARCHITECTURES.get(model_type) or MOE_ARCHITECTURES[model_type]
            raise HFConfigError(f"field {key!r} is missing; a {architecture} config needs it")
    if model_type not in FAMILY_ARCHITECTURES:
        _reject(
            d.get("hidden_act", "silu") != "silu", "hidden_act", f"{d.get('hidden_act')!r} (only 'silu' is supported)"
        )
    _reject(bool(d.get("mlp_bias")), "mlp_bias", "true (MLP biases are not supported)")
    if model_type in ("llama", "qwen3"):
        _reject(
            bool(d.get("attention_bias")),
            "attention_bias",
            "true (a bias on o_proj is not supported; only Qwen2-style q/k/v biases are)",
        )
    try:
        family = family_fields(model_type, d)
    except FamilyError as e:
        raise HFConfigError(str(e)) from None
    if model_type in ("qwen2", "qwen3", "qwen2_moe"):
        layer_types = d.get("layer_types") or []
        _reject(
            bool(d.get("use_sliding_window")) and "sliding_attention" in layer_types,
            "use_sliding_window",
            "true (sliding-window attention is not supported)",
        )
    heads = d["num_attention_heads"]
    theta, scaling = _rope_from_hf(d)
    return {
        "vocab_size": d["vocab_size"],
        "dim": d["hidden_size"],
        "ffn_dim": d["intermediate_size"],
        "n_layers": d["num_hidden_layers"],
        "n_heads": heads,
        "n_kv_heads": d.get("num_key_value_heads") or heads,
        "head_dim": d.get("head_dim") or d["hidden_size"] // heads,
        "norm_eps": d["rms_norm_eps"],
        "max_len": d["max_position_embeddings"],
        "rope_theta": theta,
        "rope_scaling": scaling,
        "tie_embeddings": bool(d.get("tie_word_embeddings", False)),
        "attn_bias": model_type == "qwen2",
        "qk_norm": model_type == "qwen3",
        "init_std": d.get("initializer_range", 0.02),
        "bos_token_id": d.get("bos_token_id"),
        "eos_token_id": d.get("eos_token_id"),
        "pad_token_id": d.get("pad_token_id"),
        **family,
    }


def _rope_from_hf(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from 5.x `rope_parameters` or 4.x `rope_theta` + `rope_scaling`."""
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", d.get("rope_theta", 10000.0)))
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    partial = params.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    _reject(partial not in (None, 1, 1.0), "partial_rotary_factor", f"{partial} (only full rotary is supported)")
    return theta, (None if kind == "default" else {"type": kind, **params})


def _same_rope(data: dict[str, Any], config: ModelConfig) -> bool:
    try:
        theta, scaling = _rope_from_hf(data)
    except HFConfigError:
        return False
    ours = _rope_parameters(config)
    theirs = {
        "rope_type": (scaling or {}).get("type", "default"),
        "rope_theta": theta,
        **{k: v for k, v in (scaling or {}).items() if k != "type"},
    }
    if "original_max_position_embeddings" not in ours:  # transformers fills it in when it re-saves
        theirs.pop("original_max_position_embeddings", None)
    return ours == theirs


def _reject(bad: bool, field: str, detail: str) -> None:
    if bad:
        raise HFConfigError(f"field {field!r} is {detail}")


def _model_config(fields: dict[str, Any]) -> ModelConfig:
    try:
        return ModelConfig.from_dict(fields)
    except ConfigError as e:
        raise HFConfigError(str(e)) from None
    except TypeError as e:  # a field of the wrong kind, e.g. a list where a number belongs
        raise HFConfigError(f"bad ModelConfig field: {e}") from None


# -- MoE families (Mixtral, Qwen2-MoE): attention, norms and RoPE as above, the MoE block in hf_moe.py
def _to_moe_dict(config: ModelConfig) -> dict[str, Any]:
    model_type = moe_model_type(config)
    out = {"model_type": model_type, "architectures": [MOE_ARCHITECTURES[model_type]]}
    return {**out, **_moe_fields(model_type, config), "astrai": config.to_dict()}


def _moe_fields(model_type: str, config: ModelConfig) -> dict[str, Any]:
    return {**_hf_fields(config, model_type), **to_hf_moe_fields(model_type, config)}


def _from_moe_dict(model_type: str, data: dict[str, Any]) -> ModelConfig:
    _check_architectures(model_type, data, MOE_ARCHITECTURES[model_type])
    defaults = MOE_DEFAULTS[model_type]
    mapped = _from_hf_fields(model_type, data, defaults)
    d = {**defaults, **{k: v for k, v in data.items() if v is not None}}
    try:
        mapped.update(from_hf_moe_fields(model_type, data, d))
    except ConfigError as e:
        raise HFConfigError(str(e)) from None
    return _with_saved_copy(data, mapped, lambda config: _moe_fields(model_type, config))
