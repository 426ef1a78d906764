"""Upstream AstrAI's state-dict names and RoPE layout, mapped to and from ours.

Why this exists: upstream AstrAI's model.safetensors names its tensors after its own modules
(`layers.N.attention.q_proj`, `layers.N.input_norm`, `layers.N.mlp.up`, `embed_tokens` at the
top level) and rotates q/k as interleaved pairs (x0, x1), (x2, x3), ... where we (like
Llama) rotate the halves (x_j, x_{j + d/2}). Renaming the tensors and permuting each head's
q/k rows (and the qk-norm weights) from one pairing to the other gives a model of ours with
the same attention scores, so the same logits; the inverse writes upstream's layout back.
See upstream_config.py for the config side.
"""

from __future__ import annotations

import re

import torch

from .config import ModelConfig

# Upstream name -> ours, outside the layers.
_TOP = {
    "embed_tokens.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
# Upstream name -> ours, inside `layers.N.`.
_LAYER = {
    "attention.q_proj.weight": "self_attn.q_proj.weight",
    "attention.k_proj.weight": "self_attn.k_proj.weight",
    "attention.v_proj.weight": "self_attn.v_proj.weight",
    "attention.o_proj.weight": "self_attn.o_proj.weight",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "attention.gate.weight": "self_attn.o_gate_proj.weight",
    "input_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
}
_LAYER_BACK = {ours: up for up, ours in _LAYER.items()}
_TOP_BACK = {ours: up for up, ours in _TOP.items()}
_UPSTREAM_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_OUR_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def from_upstream_name(name: str) -> str | None:
    """Our name for upstream tensor `name`, or None if upstream's dense model has no such tensor."""
    if name in _TOP:
        return _TOP[name]
    m = _UPSTREAM_LAYER.fullmatch(name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}"
    return None


def to_upstream_name(name: str) -> str:
    """Upstream's name for our tensor `name` (which must exist in upstream's dense model)."""
    if name in _TOP_BACK:
        return _TOP_BACK[name]
    m = _OUR_LAYER.fullmatch(name)
    if m is None or m.group(2) not in _LAYER_BACK:
        raise KeyError(f"tensor {name!r} has no counterpart in upstream AstrAI's model")
    return f"layers.{m.group(1)}.{_LAYER_BACK[m.group(2)]}"


def from_upstream_state(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict from upstream's (names already checked by the loader)."""
    out = {}
    for name, tensor in state.items():
        ours = from_upstream_name(name)
        out[ours] = _to_half_pairs(tensor, _heads(ours, config))
    return out


def to_upstream_state(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Upstream's state dict from ours."""
    return {to_upstream_name(name): _to_interleaved(t, _heads(name, config)) for name, t in state.items()}


def _heads(name: str, config: ModelConfig) -> int:
    """How many rotated heads `name` (our name) stacks along dim 0; 0 for a tensor RoPE never sees."""
    if name.endswith("q_proj.weight"):
        return config.n_heads
    if name.endswith("k_proj.weight"):
        return config.n_kv_heads
    if name.endswith(("q_norm.weight", "k_norm.weight")):
        return 1  # one head_dim vector, applied to rotated q / k (upstream order)
    return 0


def _to_half_pairs(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows (per head) ordered 0, 2, 4, ..., 1, 3, 5, ...: interleaved pairs become halves."""
    if not heads:
        return t
    rest = t.shape[1:]
    return t.reshape(heads, -1, 2, *rest).transpose(1, 2).reshape(t.shape).contiguous()


def _to_interleaved(t: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of _to_half_pairs."""
    if not heads:
        return t
    rest = t.shape[1:]
    return t.reshape(heads, 2, -1, *rest).transpose(1, 2).reshape(t.shape).contiguous()
