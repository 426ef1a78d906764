"""The decoder-only transformer shared by every architecture in the zoo.

Module names follow the Hugging Face Llama layout (model.layers.N.self_attn.q_proj, ...),
so checkpoints map onto Llama / Qwen2 / Qwen3 directories by name.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention
from .config import ModelConfig
from .kv_cache_view import KVCacheView, KVLayout
from .masks import build_attention_mask, default_position_ids, has_packed_samples
from .mla import LatentAttention
from .mlp import MLP
from .moe import MoE
from .norm import RMSNorm
from .rope import RotaryEmbedding


def _attention_class(config: ModelConfig):
    return LatentAttention if config.attn_type == "mla" else Attention


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = _attention_class(config)(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config.dim, config.ffn_dim, config.mlp_act)
        self.sandwich_norm = config.sandwich_norm
        if config.sandwich_norm:  # Gemma 2: post_attention_layernorm norms the attention output instead
            self.pre_feedforward_layernorm = RMSNorm(config.dim, config.norm_eps)
            self.post_feedforward_layernorm = RMSNorm(config.dim, config.norm_eps)

    def forward(
        self,
        x,
        cos,
        sin,
        mask,
        cache: KVCacheView | None = None,
        pending: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ):
        """(residual stream, this block's MLP output not yet added to it).

        Each residual add is left to the norm that follows it (`pending` is the previous block's
        MLP output), so add + RMSNorm is one kernel at inference on CUDA; the torch path runs
        the same ops as `x = x + f(norm(x))`. valid: the MoE balance loss's non-padding tokens."""
        if pending is None:
            h = self.input_layernorm(x)
        else:
            x, h = self.input_layernorm.add_forward(x, pending)
        attn = self.self_attn(h, cos, sin, mask, cache)
        if self.sandwich_norm:  # x + norm(attn(norm(x))), then x + norm(mlp(norm(x)))
            x, h = self.pre_feedforward_layernorm.add_forward(x, self.post_attention_layernorm(attn))
            return x, self.post_feedforward_layernorm(self.mlp(h))
        x, h = self.post_attention_layernorm.add_forward(x, attn)
        return x, (self.mlp(h, valid) if valid is not None and isinstance(self.mlp, MoE) else self.mlp(h))


class TransformerModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.embed_scale = math.sqrt(config.dim) if config.scale_embeddings else None
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.rotary = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.has_moe = config.ffn_type == "moe"

    def forward(self, input_ids, position_ids=None, attention_mask=None, cache: KVCacheView | None = None):
        # Packing can only be present when the caller gives position ids; checking for it
        # costs a host sync, so the common path (no position ids) skips it.
        packed = position_ids is not None and cache is None and has_packed_samples(position_ids)
        if position_ids is None:
            position_ids = default_position_ids(input_ids, attention_mask)
        x = self._embed(input_ids)
        cos, sin = self.rotary(position_ids, x.dtype)
        mask = None if cache is not None else build_attention_mask(position_ids, attention_mask, packed)
        valid = self._balance_tokens(attention_mask)
        pending = None
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                # Add outside the checkpoint: it then keeps one saved input per layer, not two.
                x = x if pending is None else x + pending
                x, pending = checkpoint(layer, x, cos, sin, mask, cache, None, valid, use_reentrant=False)
            else:
                x, pending = layer(x, cos, sin, mask, cache, pending, valid)
        return self.norm.add_forward(x, pending)[1]

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings, times sqrt(dim) when scale_embeddings (Gemma). The factor is first
        rounded to the embeddings' dtype, as Gemma's reference does (sqrt(3072) is 55.5 in bf16)."""
        x = self.embed_tokens(input_ids)
        if self.embed_scale is None:
            return x
        return x * torch.tensor(self.embed_scale, dtype=x.dtype)  # a CPU scalar: no device copy

    def _balance_tokens(self, attention_mask) -> torch.Tensor | None:
        """The tokens an MoE balance loss counts, flattened: non-padding ones of a (batch, seq)
        mask while training an MoE model; None (all of them) otherwise."""
        if not (self.training and self.has_moe and attention_mask is not None and attention_mask.dim() == 2):
            return None
        return attention_mask.reshape(-1) != 0


class CausalLM(nn.Module):
    """Decoder-only language model: token ids in, next-token logits out."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = TransformerModel(config)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCacheView | None = None,
        logits_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (batch, seq, vocab), or (n, vocab) for the flattened positions in logits_index.

        attention_mask: (batch, seq) with 0 for padding, or a boolean (batch, 1, seq, seq) mask.
        Packed rows are recognised by position_ids restarting at 0; samples never see each other.
        """
        hidden = self.model(input_ids, position_ids, attention_mask, cache)
        if logits_index is not None:
            hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, logits_index)
        return self.compute_logits(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of final hidden states: the LM head, soft-capped when final_logit_softcap is set."""
        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    # -- helpers used by the trainer and the engine ---------------------------------
    def kv_layout(self) -> KVLayout:
        return _attention_class(self.config).kv_layout(self.config)

    def aux_loss(self) -> torch.Tensor | float:
        """Load-balancing loss of the MoE layers from the last training forward (0 without MoE)."""
        losses = [m.aux_loss for m in self.modules() if isinstance(m, MoE) and m.aux_loss is not None]
        return self.config.moe_aux_loss_coef * sum(losses) / len(losses) if losses else 0.0

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.model.gradient_checkpointing = enabled

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        params = {id(p): p for p in self.parameters()}  # tied weights count once
        if exclude_embeddings:
            params.pop(id(self.model.embed_tokens.weight), None)
            params.pop(id(self.lm_head.weight), None)
        return sum(p.numel() for p in params.values())

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, std) init; residual output projections scaled by 1/sqrt(2 * n_layers) (GPT-2)
        so the residual stream's variance does not grow with depth."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_output = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, 0.0, out_std if is_output else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, (RMSNorm, RotaryEmbedding)):
                module.reset_parameters()
