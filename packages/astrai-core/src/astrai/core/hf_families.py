"""Hugging Face families that are a Llama underneath: Mistral, Phi-3, Gemma and Gemma 2.

Why this exists: each of these differs from Llama in a few places, and each place maps either
onto a ModelConfig field or onto the weights' layout:

  - Mistral is Llama with a `sliding_window` on every layer: ModelConfig.sliding_window with
    layer_types None, run by the windowed attention Gemma 2 brought (model and paged engine).
  - Phi-3 stores q/k/v as one `qkv_proj` matrix and gate/up as one `gate_up_proj` matrix
    (gate first); they are split on load and concatenated again on save.
  - Gemma scales the token embeddings by sqrt(hidden_size) (`scale_embeddings`), uses a
    tanh-approximated GeLU gate (`mlp_act: gelu_tanh`), sets head_dim on its own, and its
    RMSNorm multiplies by (1 + weight). Our RMSNorm multiplies by its weight, so 1 is added to
    every norm weight on load and subtracted on save (exact in float32; in bf16 the sum is
    rounded once, a difference below bf16's own precision).

  - Gemma 2 is Gemma (embedding scale, GeLU-tanh, norms of 1 + weight) plus: four norms per
    block (`sandwich_norm`: the attention and MLP outputs are normed too, and the MLP input by
    `pre_feedforward_layernorm`), attention scale query_pre_attn_scalar ** -0.5, soft-capped
    attention scores and output logits (`attn_logit_softcap`, `final_logit_softcap`), and
    sliding-window attention on the layers `layer_types` marks "sliding_attention" (every
    other one by default), which the paged engine runs with a per-layer window. A layer type
    other than full / sliding attention, bidirectional attention or attention biases are
    refused, naming the field.

hf_config.py calls the config half (what to read, what to refuse, what to write) and
checkpoint.py the weights half, so neither needs to know which family it handles. A loaded
model remembers its family in `ModelConfig.hf_family`, which save_pretrained writes back.
"""

from __future__ import annotations

from typing import Any

import torch

from .config import LAYER_TYPES, ModelConfig
from .errors import AstraiError

FAMILY_ARCHITECTURES = {
    "mistral": "MistralForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
}
_GEMMAS = ("gemma", "gemma2")  # families whose RMSNorm multiplies by (1 + weight)

# What transformers assumes when a field is absent from config.json (its config class defaults).
FAMILY_DEFAULTS = {
    "mistral": {
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "sliding_window": 4096,
        "num_key_value_heads": 8,
    },
    "phi3": {
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 32000,
        "pad_token_id": 32000,
    },
    "gemma": {
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
        "head_dim": 256,
        "num_key_value_heads": 16,
        "hidden_act": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
    },
    "gemma2": {
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
        "head_dim": 256,
        "num_key_value_heads": 4,
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
    },
}

# transformers' names for the tanh GeLU; GemmaConfig reads a plain "gelu" as the tanh one too.
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_new", "gelu")

# Phi-3's fused matrices: the fused name, then our parts in the order they are stacked (dim 0).
_FUSED = {
    "phi3": {
        "self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    }
}


class FamilyError(AstraiError):
    """config.json of a Mistral / Phi-3 / Gemma / Gemma 2 model asks for something we cannot run exactly."""


def _reject(bad: bool, field: str, detail: str) -> None:
    if bad:
        raise FamilyError(f"field {field!r} is {detail}")


# -- config: import -----------------------------------------------------------------------------
def family_fields(model_type: str, d: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields the family sets beyond Llama's, from config.json contents `d` (the
    family's defaults already filled in); refuses what we would compute differently."""
    if model_type == "mistral":  # a window slides on every layer (ModelConfig.layer_types None)
        _check_act(d, ("silu",))
        window = d.get("sliding_window")
        return {"hf_family": model_type, **({"sliding_window": window} if window else {})}
    if model_type == "phi3":
        _check_sliding_window(d)
        _check_act(d, ("silu",))
        return {"hf_family": model_type}
    if model_type in _GEMMAS:
        if model_type == "gemma":
            _check_act(d, _GELU_TANH)
        else:  # Gemma2Config reads hidden_activation, where a plain "gelu" is the exact (erf) one
            act = d["hidden_activation"]
            _reject(act not in _GELU_TANH[:2], "hidden_activation", f"{act!r} (Gemma 2 supports gelu_pytorch_tanh)")
        _reject(bool(d.get("attention_bias")), "attention_bias", "true (biases on q/k/v/o are not supported)")
        _reject(
            bool(d.get("use_bidirectional_attention")),
            "use_bidirectional_attention",
            "true (only causal attention is supported)",
        )
        fields = {"hf_family": model_type, "mlp_act": "gelu_tanh", "scale_embeddings": True}
        return fields if model_type == "gemma" else {**fields, **_gemma2_fields(d)}
    return {}


def _gemma2_fields(d: dict[str, Any]) -> dict[str, Any]:
    """Gemma 2's window, layer types, soft-caps, attention scale and four norms per block."""
    n_layers, window = d["num_hidden_layers"], d.get("sliding_window")
    # Gemma2Config's default: layers 0, 2, 4, ... slide; 1, 3, 5, ... attend to everything.
    default = [("sliding_attention" if i % 2 == 0 else "full_attention") for i in range(n_layers)]
    types = d.get("layer_types") or default
    _reject(
        not isinstance(types, list) or len(types) != n_layers,
        "layer_types",
        f"{types!r}: it needs one entry per layer ({n_layers})",
    )
    unknown = sorted({str(t) for t in types} - set(LAYER_TYPES))
    _reject(bool(unknown), "layer_types", f"{types!r}: {unknown} not supported (only {', '.join(LAYER_TYPES)})")
    return {
        "sandwich_norm": True,
        "sliding_window": window,
        "layer_types": None if window is None else list(types),  # no window: sliding layers see everything
        "attn_logit_softcap": d.get("attn_logit_softcapping"),
        "final_logit_softcap": d.get("final_logit_softcapping"),
        "query_pre_attn_scalar": d["query_pre_attn_scalar"],
    }


def _check_sliding_window(d: dict[str, Any]) -> None:
    window, max_len = d.get("sliding_window"), d["max_position_embeddings"]
    _reject(
        window is not None and window < max_len,
        "sliding_window",
        f"{window}, shorter than max_position_embeddings ({max_len}): sliding-window attention is not "
        "supported (the paged engine attends to the whole context); to run it on sequences no longer "
        f"than the window, where both agree, set max_position_embeddings to {window}",
    )


def _check_act(d: dict[str, Any], allowed: tuple[str, ...]) -> None:
    act = d.get("hidden_act", allowed[0])
    _reject(act not in allowed, "hidden_act", f"{act!r} (this family supports {', '.join(allowed)})")


# -- config: export -----------------------------------------------------------------------------
def family_for(config: ModelConfig) -> str | None:
    """The family (of this module) that save_pretrained writes `config` as, or None.

    The caller has checked that the architecture is plain GQA with a dense MLP."""
    no_bias_or_qk_norm = not (config.attn_bias or config.qk_norm)
    llama_like = not (config.attn_bias or config.qk_norm or config.scale_embeddings) and config.mlp_act == "silu"
    if config.hf_family == "mistral" and llama_like and _window_only(config):
        return "mistral"
    if config.has_gemma2_features:  # only Gemma 2 has its norms, soft-caps and windows
        gemma2 = config.sandwich_norm and config.scale_embeddings and config.mlp_act == "gelu_tanh"
        return "gemma2" if gemma2 and no_bias_or_qk_norm else None
    wanted = config.hf_family
    if wanted == "mistral" and llama_like:
        return "mistral"
    if (
        wanted == "phi3"
        and llama_like
        and config.rope_scaling is None
        and config.dim == config.n_heads * config.head_dim
    ):
        return "phi3"  # Phi-3 derives head_dim from hidden_size and knows no rope scaling but longrope
    if config.scale_embeddings and config.mlp_act == "gelu_tanh" and not (config.attn_bias or config.qk_norm):
        return "gemma"
    return None


def _window_only(config: ModelConfig) -> bool:
    """No Gemma 2 feature but (perhaps) one window for every layer: what MistralConfig says."""
    extras = (config.attn_logit_softcap, config.final_logit_softcap, config.query_pre_attn_scalar)
    return not config.sandwich_norm and config.layer_types is None and all(x is None for x in extras)


def family_hf_fields(model_type: str, config: ModelConfig, fields: dict[str, Any]) -> dict[str, Any]:
    """The config.json fields (Llama's, in `fields`) adjusted for the family."""
    out = dict(fields)
    if model_type == "mistral":
        out["sliding_window"] = config.sliding_window
    elif model_type == "phi3":
        out.pop("head_dim")  # Phi3Config has none: hidden_size // num_attention_heads
        out["sliding_window"] = None
        out["original_max_position_embeddings"] = config.max_len
    elif model_type == "gemma":
        out["hidden_act"] = "gelu_pytorch_tanh"
        out["attention_bias"] = False
    elif model_type == "gemma2":
        out.pop("hidden_act")
        n = config.n_layers
        out.update(
            hidden_activation="gelu_pytorch_tanh",
            attention_bias=False,
            query_pre_attn_scalar=config.query_pre_attn_scalar or config.head_dim,
            # No window: every layer full; the window then goes unread but Gemma2Config wants a number.
            sliding_window=config.sliding_window or config.max_len,
            layer_types=["full_attention" if config.layer_window(i) is None else "sliding_attention" for i in range(n)],
            attn_logit_softcapping=config.attn_logit_softcap,
            final_logit_softcapping=config.final_logit_softcap,
        )
    return out


# -- weights ------------------------------------------------------------------------------------
def hf_shapes(shapes: dict[str, tuple], model_type: str) -> dict[str, tuple]:
    """{name: shape} of the tensors on disk for a model whose own tensors are `shapes`."""
    fused = _FUSED.get(model_type)
    if not fused:
        return dict(shapes)
    out: dict[str, tuple] = {}
    for name, shape in shapes.items():
        hit = _fused_group(name, fused)
        if hit is None:
            out[name] = shape
        elif hit[1] == 0:  # the first part stands for the whole fused matrix
            parts = [shapes[hit[0] + part] for part in fused[hit[2]]]
            out[hit[0] + hit[2]] = (sum(p[0] for p in parts), *parts[0][1:])
    return out


def from_hf_state(state: dict[str, torch.Tensor], shapes: dict[str, tuple], model_type: str) -> dict[str, torch.Tensor]:
    """Our state dict from one read in the family's layout; `shapes` are our tensors' shapes."""
    out: dict[str, torch.Tensor] = {}
    fused = _FUSED.get(model_type, {})
    for name, tensor in state.items():
        prefix, group = _split_name(name, fused)
        if group is None:
            out[name] = _norm_from_hf(name, tensor, model_type)
            continue
        parts = [prefix + part for part in fused[group]]
        pieces = tensor.split([shapes[p][0] for p in parts], dim=0)
        out.update({p: piece.clone() for p, piece in zip(parts, pieces)})  # no storage shared between weights
    return out


def to_hf_state(state: dict[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    """The family's layout of our state dict (names in our order, fused matrices where the first part was)."""
    fused = _FUSED.get(model_type, {})
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        hit = _fused_group(name, fused)
        if hit is None:
            out[name] = _norm_to_hf(name, tensor, model_type)
        elif hit[1] == 0:
            prefix, _, group = hit
            out[prefix + group] = torch.cat([state[prefix + part] for part in fused[group]], dim=0)
    return out


def _fused_group(name: str, fused: dict[str, tuple[str, ...]]) -> tuple[str, int, str] | None:
    """(layer prefix, index of the part, fused name) when our tensor `name` is part of a fused one."""
    for group, parts in fused.items():
        for i, part in enumerate(parts):
            if name.endswith("." + part):
                return name[: -len(part)], i, group
    return None


def _split_name(name: str, fused: dict[str, tuple[str, ...]]) -> tuple[str, str | None]:
    """(layer prefix, fused name) when `name` is a fused tensor on disk, else (name, None)."""
    for group in fused:
        if name.endswith("." + group):
            return name[: -len(group)], group
    return name, None


def _is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


def _norm_from_hf(name: str, tensor: torch.Tensor, model_type: str) -> torch.Tensor:
    if model_type not in _GEMMAS or not _is_norm(name):
        return tensor
    return (tensor.float() + 1.0).to(tensor.dtype)  # Gemma's RMSNorm multiplies by (1 + weight)


def _norm_to_hf(name: str, tensor: torch.Tensor, model_type: str) -> torch.Tensor:
    if model_type not in _GEMMAS or not _is_norm(name):
        return tensor
    return (tensor.float() - 1.0).to(tensor.dtype)
