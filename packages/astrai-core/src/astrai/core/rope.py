"""Rotary position embeddings, with the linear / dynamic-NTK / static-NTK / YaRN / Llama-3 frequency scalings."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig
from .kernels.dispatch import use_fused


def rope_frequencies(config: ModelConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (float32, rope_dim // 2) and the attention scaling applied to cos/sin."""
    dim, base = config.rope_dim, float(config.rope_theta)
    scaling = config.rope_scaling or {}
    kind = rope_kind(config)
    factor = float(scaling.get("factor", 1.0))
    original = int(scaling.get("original_max_position_embeddings", config.max_len))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if kind == "dynamic" and seq_len is not None and seq_len > original:
        # NTK-aware: grow the base so the longest wavelength covers the longer context.
        base = base * ((factor * seq_len / original) - (factor - 1)) ** (dim / (dim - 2))
    if kind == "ntk":
        # Static NTK-aware (upstream AstrAI's "ntk"): the base grows once by factor^(d/(d-2)),
        # which stretches the longest wavelength by `factor` and keeps the shortest almost as is.
        base = base * factor ** (dim / (dim - 2))
    inv_freq = 1.0 / base**exponents
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "yarn":
        return _yarn(inv_freq, dim, base, factor, original, scaling)
    if kind == "llama3":
        return _llama3(inv_freq, factor, original, scaling), 1.0
    return inv_freq, 1.0


def rope_kind(config: ModelConfig) -> str:
    """The scaling type; both our "type" key and transformers' "rope_type" key are accepted."""
    scaling = config.rope_scaling or {}
    return scaling.get("type", scaling.get("rope_type", "default"))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(inv_freq, dim, base, factor, original, scaling) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, keep high ones, blend with a linear ramp between."""
    attention = scaling.get("attention_factor")
    if attention is None:
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all:
            attention = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
        else:
            attention = _yarn_mscale(factor)
    beta_fast, beta_slow = float(scaling.get("beta_fast") or 32), float(scaling.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):  # the original YaRN rounds the ramp to whole dimensions
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = (torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)
    keep = 1.0 - ramp.clamp(0, 1)  # 1 where the original (extrapolated) frequency is kept
    blended = (inv_freq / factor) * (1 - keep) + inv_freq * keep
    return blended, float(attention)


def _llama3(inv_freq, factor, original, scaling) -> torch.Tensor:
    """Llama 3.1: scale long wavelengths by `factor`, keep short ones, smooth in between."""
    low_ff, high_ff = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    low_wavelen, high_wavelen = original / low_ff, original / high_ff
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Turns position ids into (cos, sin) tables of shape (batch, seq, rope_dim)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        inv_freq, self.attention_scaling = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.dynamic = rope_kind(config) == "dynamic"

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if self.dynamic:
            inv_freq = self._dynamic_inv_freq(position_ids)
        elif inv_freq.dtype in (torch.bfloat16, torch.float16):
            # FSDP's mixed precision casts buffers by assigning .data, which _apply below never sees.
            inv_freq = rope_frequencies(self.config)[0]
        freqs = position_ids[..., None].float() * inv_freq.float().to(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:  # x * 1.0 == x: skip two kernels per step
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)

    def _dynamic_inv_freq(self, position_ids: torch.Tensor) -> torch.Tensor:
        seq_len = int(position_ids.max()) + 1
        return rope_frequencies(self.config, seq_len)[0].to(position_ids.device)

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) casts buffers too, and bf16 frequencies (8 mantissa bits) put far
        # positions in the wrong place. Keep them float32 whatever dtype the weights take.
        super()._apply(fn, recurse)
        if self.inv_freq.dtype in (torch.bfloat16, torch.float16):
            self.inv_freq = rope_frequencies(self.config)[0].to(self.inv_freq.device)
        return self

    def reset_parameters(self) -> None:
        """Recompute the (non-persistent) frequencies, e.g. after building the model on the meta device."""
        self.inv_freq = rope_frequencies(self.config)[0].to(self.inv_freq.device)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, seq, heads, rope_dim); cos/sin: (batch, seq, rope_dim)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + rotate_half(x) * sin


def apply_rope_qk(q, k, cos, sin, norms=None, norm_after_rope: bool = False):
    """(rope(q), rope(k)), after per-head RMSNorms `norms` = (q_norm, k_norm) when given, or
    before them when norm_after_rope (upstream AstrAI's order).

    At inference on CUDA this is one fused kernel instead of ~10 (~26 with the norms)."""
    if norms is not None and norm_after_rope:
        q, k = apply_rope_qk(q, k, cos, sin)
        return norms[0](q), norms[1](k)
    if use_fused(q):
        from .kernels import fused_rope

        weights = None if norms is None else (norms[0].weight, norms[1].weight)
        eps_ok = norms is None or norms[0].eps == norms[1].eps
        if eps_ok and fused_rope.supports(q, k, cos, weights) and sin.shape == cos.shape and sin.dtype == cos.dtype:
            return fused_rope.qk_rope(q, k, cos, sin, weights, norms[0].eps if norms else 0.0)
    if norms is not None:
        q, k = norms[0](q), norms[1](k)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)
