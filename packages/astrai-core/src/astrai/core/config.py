"""Model configuration: one dataclass describes every architecture in the zoo."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AstraiError, require_for

ROPE_SCALING_TYPES = ("linear", "dynamic", "ntk", "yarn", "llama3")
ATTENTION_TYPES = ("gqa", "mla")
FFN_TYPES = ("mlp", "moe")
MLP_ACTIVATIONS = ("silu", "gelu_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")  # transformers' names for a layer's attention span


class ConfigError(AstraiError):
    """A configuration value is wrong; the message names the field and the fix."""


_require = require_for("ModelConfig", ConfigError)


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int | None = None  # None: same as n_heads (multi-head attention)
    head_dim: int | None = None  # None: dim // n_heads
    ffn_dim: int | None = None  # None: ~8/3 * dim rounded up to a multiple of 64
    norm_eps: float = 1e-6
    max_len: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_embeddings: bool = False
    attn_bias: bool = False  # bias on q/k/v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm on each head's q and k (Qwen3)
    qk_norm_after_rope: bool = False  # apply qk_norm to the rotated q and k (upstream AstrAI), not before
    gated_attn: bool = False  # sigmoid output gate per head, computed from the input
    attn_type: str = "gqa"
    # Multi-head latent attention (DeepSeek-V2 style); used when attn_type == "mla".
    q_lora_rank: int | None = None  # None: q projected directly
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    ffn_type: str = "mlp"
    mlp_act: str = "silu"  # gate activation of the gated MLP: SwiGLU ("silu") or GeGLU with tanh GeLU (Gemma)
    scale_embeddings: bool = False  # multiply token embeddings by sqrt(dim) (Gemma)
    # The transformers model_type save_pretrained writes when that family runs this architecture
    # exactly ("mistral", "phi3", "gemma"; set when such a directory is loaded). None: Llama, Qwen2
    # or Qwen3, as the architecture decides (hf_config.hf_model_type).
    hf_family: str | None = None
    # Gemma 2's attention and block (all off by default). Sliding-window attention: on a layer that
    # slides, the query at position p sees only keys p - sliding_window + 1 .. p. layer_types says
    # which layers slide, one entry per layer ("sliding_attention" / "full_attention"); None: every
    # layer slides when sliding_window is set.
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    attn_logit_softcap: float | None = None  # attention scores s -> cap * tanh(s / cap) before the softmax
    final_logit_softcap: float | None = None  # output logits z -> cap * tanh(z / cap)
    query_pre_attn_scalar: float | None = None  # the attention scale is its -1/2 power; None: head_dim's
    # Norms on the attention and MLP outputs too (before each residual add), and the MLP input
    # normed by a norm of its own: four per block (Gemma 2).
    sandwich_norm: bool = False
    # Mixture of experts; used when ffn_type == "moe".
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    n_activated_experts: int = 2
    moe_ffn_dim: int | None = None  # None: ffn_dim
    moe_aux_loss_coef: float = 0.01
    # True: the top-k router probabilities are rescaled to sum to 1 (Mixtral, Qwen2-MoE with
    # norm_topk_prob); False: each chosen expert is weighted by its softmax over all experts.
    moe_norm_topk: bool = True
    moe_shared_ffn_dim: int | None = None  # width of the shared experts' MLP; None: n_shared_experts * moe_ffn_dim
    moe_shared_gate: bool = False  # a per-token sigmoid gate on the shared experts' output (Qwen2-MoE)
    moe_dense_layers: list[int] = field(default_factory=list)  # layers with a dense ffn_dim MLP instead
    init_std: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes kept on round-trip

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None and self.n_heads and self.dim % self.n_heads == 0:
            self.head_dim = self.dim // self.n_heads
        if self.ffn_dim is None:
            self.ffn_dim = 64 * -(-int(8 * self.dim / 3) // 64)
        if self.moe_ffn_dim is None:
            self.moe_ffn_dim = self.ffn_dim
        self.validate()

    # -- validation -------------------------------------------------------------
    def validate(self) -> None:
        positive = ["vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_len"]
        for name in positive:
            _require(
                isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                name,
                f"must be a positive integer, got {getattr(self, name)!r}",
            )
        _require(
            self.head_dim is not None and self.head_dim > 0,
            "head_dim",
            f"must be positive; set it explicitly when dim ({self.dim}) is not divisible by n_heads ({self.n_heads})",
        )
        _require(
            self.n_heads % self.n_kv_heads == 0,
            "n_kv_heads",
            f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})",
        )
        _require(self.norm_eps > 0, "norm_eps", f"must be > 0, got {self.norm_eps}")
        _require(self.rope_theta > 0, "rope_theta", f"must be > 0, got {self.rope_theta}")
        _require(
            self.attn_type in ATTENTION_TYPES, "attn_type", f"must be one of {ATTENTION_TYPES}, got {self.attn_type!r}"
        )
        _require(self.ffn_type in FFN_TYPES, "ffn_type", f"must be one of {FFN_TYPES}, got {self.ffn_type!r}")
        _require(self.mlp_act in MLP_ACTIVATIONS, "mlp_act", f"must be one of {MLP_ACTIVATIONS}, got {self.mlp_act!r}")
        _require(
            self.mlp_act == "silu" or self.ffn_type == "mlp",
            "mlp_act",
            f"{self.mlp_act!r} needs ffn_type 'mlp' (MoE experts are SwiGLU); use mlp_act 'silu'",
        )
        _require(
            self.hf_family is None or isinstance(self.hf_family, str),
            "hf_family",
            f"must be a transformers model_type such as 'mistral', or null; got {self.hf_family!r}",
        )
        if self.attn_type == "mla":
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                _require(getattr(self, name) > 0, name, "must be > 0 for attn_type='mla'")
            _require(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even (rotary pairs)")
            _require(not self.qk_norm, "qk_norm", "is not supported with attn_type='mla' (MLA normalises its latents)")
        else:
            _require(self.head_dim % 2 == 0, "head_dim", f"must be even for rotary embeddings, got {self.head_dim}")
        _require(
            self.qk_norm or not self.qk_norm_after_rope,
            "qk_norm_after_rope",
            "needs qk_norm: true (it says where the qk-norm goes); set qk_norm or drop qk_norm_after_rope",
        )
        if self.ffn_type == "moe":
            _require(self.n_routed_experts > 0, "n_routed_experts", "must be > 0 for ffn_type='moe'")
            _require(
                0 < self.n_activated_experts <= self.n_routed_experts,
                "n_activated_experts",
                f"must be in 1..n_routed_experts ({self.n_routed_experts}), got {self.n_activated_experts}",
            )
            _require(self.n_shared_experts >= 0, "n_shared_experts", "must be >= 0")
            self._validate_moe_extras()
        self._validate_rope_scaling()
        self._validate_gemma2_fields()

    def _validate_gemma2_fields(self) -> None:
        window, types = self.sliding_window, self.layer_types
        _require(
            window is None or (isinstance(window, int) and not isinstance(window, bool) and window > 0),
            "sliding_window",
            f"must be a positive integer (keys a sliding layer sees) or null, got {window!r}",
        )
        _require(
            types is None
            or (isinstance(types, list) and len(types) == self.n_layers and all(t in LAYER_TYPES for t in types)),
            "layer_types",
            f"must be null or a list of {self.n_layers} entries (one per layer), each one of {LAYER_TYPES}; "
            f"got {types!r}",
        )
        _require(
            window is not None or not types or "sliding_attention" not in types,
            "layer_types",
            "has sliding_attention layers but sliding_window is null; set sliding_window or make them full_attention",
        )
        for name in ("attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar"):
            value = getattr(self, name)
            _require(
                value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0),
                name,
                f"must be a positive number or null, got {value!r}",
            )
        if self.attn_type == "mla":
            for name in ("sliding_window", "attn_logit_softcap", "query_pre_attn_scalar"):
                _require(getattr(self, name) is None, name, "is not supported with attn_type='mla'; set it to null")

    def _validate_moe_extras(self) -> None:
        shared = self.moe_shared_ffn_dim
        _require(
            shared is None or (isinstance(shared, int) and shared > 0 and self.n_shared_experts > 0),
            "moe_shared_ffn_dim",
            f"must be a positive integer with n_shared_experts > 0, or null; got {shared!r}",
        )
        _require(
            not self.moe_shared_gate or self.n_shared_experts > 0,
            "moe_shared_gate",
            "needs shared experts (n_shared_experts > 0) to gate",
        )
        layers = self.moe_dense_layers
        _require(
            isinstance(layers, list) and all(isinstance(i, int) and 0 <= i < self.n_layers for i in layers),
            "moe_dense_layers",
            f"must be a list of layer indices in 0..{self.n_layers - 1}, got {layers!r}",
        )

    def _validate_rope_scaling(self) -> None:
        s = self.rope_scaling
        if s is None:
            return
        _require(
            isinstance(s, dict), "rope_scaling", "must be a mapping like {'type': 'linear', 'factor': 2.0} or null"
        )
        kind = s.get("type", s.get("rope_type"))
        _require(
            kind in ROPE_SCALING_TYPES + ("default",),
            "rope_scaling.type",
            f"must be one of {ROPE_SCALING_TYPES}, got {kind!r}",
        )
        if kind != "default":
            factor = s.get("factor")
            _require(
                isinstance(factor, (int, float)) and factor >= 1.0,
                "rope_scaling.factor",
                f"must be a number >= 1, got {factor!r}",
            )
        if kind == "llama3":
            for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                _require(key in s, f"rope_scaling.{key}", "is required for rope type 'llama3'")

    # -- derived ------------------------------------------------------------------
    @property
    def rope_dim(self) -> int:
        """Width of the rotated part of q/k."""
        return self.qk_rope_head_dim if self.attn_type == "mla" else self.head_dim

    @property
    def shared_ffn_dim(self) -> int:
        """Width of the shared experts' MLP (0: none)."""
        if self.n_shared_experts == 0:
            return 0
        return self.moe_shared_ffn_dim or self.n_shared_experts * self.moe_ffn_dim

    def layer_window(self, layer_idx: int) -> int | None:
        """The sliding window of layer `layer_idx`, or None when it attends to the whole context."""
        if self.sliding_window is None or (self.layer_types and self.layer_types[layer_idx] != "sliding_attention"):
            return None
        return self.sliding_window

    @property
    def has_gemma2_features(self) -> bool:
        """Whether any of Gemma 2's additions is on (only the gemma2 family writes them to config.json)."""
        extras = (self.sliding_window, self.attn_logit_softcap, self.final_logit_softcap, self.query_pre_attn_scalar)
        return self.sandwich_norm or any(x is not None for x in extras)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` routes through experts (not a dense MLP)."""
        return self.ffn_type == "moe" and layer_idx not in self.moe_dense_layers

    # -- serialisation ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> ModelConfig:
        p = Path(path_or_text) if not str(path_or_text).lstrip().startswith("{") else None
        try:
            data = json.loads(p.read_text(encoding="utf-8") if p else str(path_or_text))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p or 'config text'} is not valid JSON: {e}") from None
        return cls.from_dict(data)
