"""Upstream AstrAI's config.json, mapped to and from ModelConfig.

Why this exists: people arrive from upstream AstrAI (github ViperEkura/AstrAI, v1.3.x) with
model directories whose config.json uses that project's own field names and `model_type`
"autoregressive_lm" (or none at all). This module reads such a config into a ModelConfig that
computes the same function, refuses what we cannot run exactly (naming the field), and writes
one back for `save_pretrained(..., format="astrai-upstream")`. The weights' names and layout
are mapped in upstream_weights.py.

Upstream renamed its fields after v1.3.9 (`dim` -> `hidden_size`, `n_layers` ->
`num_hidden_layers`, ...). Both spellings are read; a save writes the spelling the model was
read with, v1.3.9's for a model that never was.

What upstream's forward does, and what it maps to here:
  - pre-norm blocks (input_norm, post_attention_norm), RMSNorm, SwiGLU MLP without biases;
  - RoPE on interleaved pairs (our rotate-half layout after permuting q/k rows, see
    upstream_weights.py), base `rope_theta` (10000 when null), `rope_scaling: {type: ntk}`
    (the type defaults to ntk; upstream silently ignores any other type, so we refuse it);
  - `use_qk_norm`: RMSNorm on q and k *after* RoPE (our `qk_norm_after_rope`);
  - `use_gated_attention`: a per-channel sigmoid gate on the attention output (our `gated_attn`);
  - `tie_weight` / `tie_word_embeddings`: only `true` ties the head; null or false does not.
"""

from __future__ import annotations

from typing import Any

from .config import ConfigError, ModelConfig
from .errors import AstraiError
from .rope import rope_kind

UPSTREAM_FORMAT = "astrai-upstream"
UPSTREAM_MODEL_TYPE = "autoregressive_lm"
V139, HF_NAMES = "v1.3.9", "hf"

# ModelConfig field -> (upstream v1.3.9 name, upstream's later Hugging Face-style name).
_RENAMED = {
    "vocab_size": ("vocab_size", "vocab_size"),
    "dim": ("dim", "hidden_size"),
    "n_layers": ("n_layers", "num_hidden_layers"),
    "ffn_dim": ("dim_ffn", "intermediate_size"),
    "n_heads": ("n_heads", "num_attention_heads"),
    "n_kv_heads": ("n_kv_heads", "num_key_value_heads"),
    "max_len": ("max_len", "max_position_embeddings"),
    "norm_eps": ("norm_eps", "rms_norm_eps"),
    "tie_embeddings": ("tie_weight", "tie_word_embeddings"),
}
_REQUIRED = ("vocab_size", "dim", "n_layers", "ffn_dim", "n_heads", "n_kv_heads", "max_len", "norm_eps")
_SHARED = {"model_type", "rope_theta", "rope_scaling", "attn_type", "ffn_type", "use_qk_norm", "use_gated_attention"}
_TRAINING_ONLY = {"neftune_alpha"}  # noise on the embeddings while training; no effect on the forward
# Fields of upstream's MLA / MoE variants: inert unless attn_type / ffn_type selects them.
_VARIANT_FIELDS = {
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "n_routed_experts",
    "n_shared_experts",
    "n_activated_experts",
    "topk_method",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "norm_topk_prob",
    "decoder_sparse_step",
    "mlp_only_layers",
    "moe_aux_loss_coef",
}
_BOOKKEEPING = {"architectures", "dtype", "torch_dtype", "transformers_version", "_name_or_path"}
# The pre-v1.3 (KHAOSZ) spelling, recognised only to say what to do with it.
_KHAOSZ_NAMES = {"n_dim": "dim", "n_head": "n_heads", "n_kvhead": "n_kv_heads", "d_ffn": "dim_ffn"}


class UpstreamConfigError(AstraiError):
    """An upstream AstrAI config.json describes a model we cannot run exactly; names the field."""


def is_upstream_config(data: dict[str, Any]) -> bool:
    """True for upstream AstrAI's config.json: model_type "autoregressive_lm", null or absent
    (every directory we or transformers write names another model_type)."""
    return data.get("model_type") in (None, UPSTREAM_MODEL_TYPE)


# -- reading --------------------------------------------------------------------------------
def from_upstream_dict(data: dict[str, Any]) -> ModelConfig:
    """The ModelConfig computing what upstream's AutoRegressiveLM computes for this config."""
    names = _naming(data)
    _check_known(data, names)
    fields = {ours: data.get(_upstream_name(ours, names)) for ours in _RENAMED}
    _check_required(fields, names)
    _check_variant(data)
    heads = fields["n_heads"]
    _reject(
        fields["dim"] % heads != 0,
        _upstream_name("dim", names),
        f"({fields['dim']}) is not a multiple of {_upstream_name('n_heads', names)} ({heads}); upstream needs it",
    )
    qk_norm = bool(data.get("use_qk_norm"))
    fields.update(
        head_dim=fields["dim"] // heads,
        tie_embeddings=fields["tie_embeddings"] is True,
        rope_theta=float(data.get("rope_theta") or 10000.0),
        rope_scaling=_rope_scaling(data.get("rope_scaling")),
        qk_norm=qk_norm,
        qk_norm_after_rope=qk_norm,
        gated_attn=bool(data.get("use_gated_attention")),
        extra={"upstream": {"names": names, "neftune_alpha": data.get("neftune_alpha", 0.0)}},
    )
    try:
        return ModelConfig.from_dict(fields)
    except (ConfigError, TypeError) as e:
        raise UpstreamConfigError(f"upstream AstrAI config: {e}") from None


def _check_required(fields: dict[str, Any], names: str) -> None:
    for ours in _REQUIRED:
        value, name = fields[ours], _upstream_name(ours, names)
        _reject(value is None, name, "is missing or null; upstream needs it too")
        if ours == "norm_eps":
            _reject(not isinstance(value, (int, float)) or value <= 0, name, f"must be a number > 0, got {value!r}")
        else:
            _reject(
                not isinstance(value, int) or isinstance(value, bool) or value <= 0,
                name,
                f"must be a positive integer, got {value!r}",
            )


def _naming(data: dict[str, Any]) -> str:
    """Which spelling of upstream's fields `data` uses; refuses a mixture and pre-v1.3 names."""
    old = sorted(n for n, _ in _RENAMED.values() if n in data and n != "vocab_size")
    new = sorted(n for _, n in _RENAMED.values() if n in data and n != "vocab_size")
    if old and new:
        raise UpstreamConfigError(
            f"field {new[0]!r} appears beside v1.3.9's {old[0]!r}; one config.json must use one spelling "
            "of upstream's fields"
        )
    khaosz = sorted(set(data) & set(_KHAOSZ_NAMES))
    if khaosz and not old and not new:
        renames = ", ".join(f"{k} -> {v}" for k, v in _KHAOSZ_NAMES.items())
        raise UpstreamConfigError(
            f"field {khaosz[0]!r} is a pre-v1.3 (KHAOSZ) field name; rename the fields as v1.3.9 spells "
            f"them ({renames}, m_len -> max_len, n_layer -> n_layers)"
        )
    return HF_NAMES if new else V139


def _check_known(data: dict[str, Any], names: str) -> None:
    known = {_RENAMED[f][names == HF_NAMES] for f in _RENAMED} | _SHARED | _TRAINING_ONLY | _VARIANT_FIELDS
    unknown = sorted(set(data) - known - _BOOKKEEPING)
    _reject(
        bool(unknown),
        unknown[0] if unknown else "",
        f"is not a field of upstream AstrAI's {names} config (a config.json without model_type is read as "
        f"upstream's); remove it, or set model_type (known upstream fields: {sorted(known)})",
    )


def _check_variant(data: dict[str, Any]) -> None:
    attn, ffn = data.get("attn_type") or "gqa", data.get("ffn_type") or "mlp"
    _reject(
        attn != "gqa",
        "attn_type",
        f"is {attn!r}; only upstream's 'gqa' attention loads here (its MLA layout has no counterpart in ours)",
    )
    _reject(
        ffn != "mlp",
        "ffn_type",
        f"is {ffn!r}; only upstream's dense 'mlp' loads here (its DeepSeekMoE weights are not mapped)",
    )


def _rope_scaling(scaling: Any) -> dict[str, Any] | None:
    if scaling is None:
        return None
    _reject(not isinstance(scaling, dict), "rope_scaling", f"must be an object like {{'type': 'ntk'}}, got {scaling!r}")
    kind = scaling.get("type", "ntk")  # upstream's default when the type is left out
    _reject(
        kind != "ntk",
        "rope_scaling.type",
        f"is {kind!r}, which upstream AstrAI ignores (it applies only 'ntk' and leaves RoPE unscaled "
        "otherwise); set it to 'ntk' or remove rope_scaling",
    )
    return {"type": "ntk", "factor": scaling.get("factor", 1.0)}  # upstream reads no other key


# -- writing --------------------------------------------------------------------------------
def to_upstream_dict(config: ModelConfig) -> dict[str, Any]:
    """Upstream AstrAI's config.json for `config`; fails naming our field where upstream has
    no way to express it."""
    check_upstream_expressible(config)
    notes = config.extra.get("upstream") or {}
    names = notes.get("names", V139)
    out: dict[str, Any] = {"model_type": UPSTREAM_MODEL_TYPE}
    for ours, spelled in _RENAMED.items():
        out[spelled[names == HF_NAMES]] = getattr(config, ours)
    out.update(
        rope_theta=float(config.rope_theta),
        rope_scaling=dict(config.rope_scaling) if config.rope_scaling else None,
        attn_type="gqa",
        use_qk_norm=config.qk_norm,
        use_gated_attention=config.gated_attn,
        ffn_type="mlp",
        neftune_alpha=notes.get("neftune_alpha", 0.0),
    )
    return out


def check_upstream_expressible(config: ModelConfig) -> None:
    """Raise naming the ModelConfig field that upstream AstrAI's model cannot express."""
    bad = [
        (config.attn_type != "gqa", "attn_type", f"is {config.attn_type!r}; upstream's MLA differs from ours"),
        (config.ffn_type != "mlp", "ffn_type", f"is {config.ffn_type!r}; upstream's MoE is not mapped"),
        (config.attn_bias, "attn_bias", "is true; upstream's projections have no biases"),
        (
            config.head_dim * config.n_heads != config.dim,
            "head_dim",
            f"({config.head_dim}) times n_heads ({config.n_heads}) must equal dim ({config.dim}) upstream",
        ),
        (
            config.qk_norm and not config.qk_norm_after_rope,
            "qk_norm_after_rope",
            "is false; upstream normalises q and k after RoPE, so a qk-norm before it cannot be written",
        ),
        (
            config.rope_scaling is not None and rope_kind(config) != "ntk",
            "rope_scaling.type",
            f"is {rope_kind(config)!r}; upstream applies only 'ntk' (or none)",
        ),
        (config.mlp_act != "silu", "mlp_act", f"is {config.mlp_act!r}; upstream's MLP is SwiGLU"),
        (config.scale_embeddings, "scale_embeddings", "is true; upstream does not scale its embeddings"),
    ]
    gemma2 = ("sandwich_norm", "sliding_window", "attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar")
    bad += [
        (getattr(config, f) not in (None, False), f, "is set; upstream has none of Gemma 2's additions") for f in gemma2
    ]
    for is_bad, field, detail in bad:
        _reject(is_bad, f"ModelConfig.{field}", f"{detail}: not expressible in format {UPSTREAM_FORMAT!r}")


def _upstream_name(ours: str, names: str) -> str:
    return _RENAMED[ours][names == HF_NAMES]


def _reject(bad: object, field: str, detail: str) -> None:
    if bad:
        raise UpstreamConfigError(f"field {field!r} {detail}")
