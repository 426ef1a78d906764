"""Hugging Face families that are a Llama underneath: Mistral.

Why this exists: each such family differs from Llama in a few places, and each place maps
either onto a ModelConfig field or onto the weights' layout:

  - Mistral is Llama with a `sliding_window`. We run full causal attention (the paged engine
    has no windowed attention), which is the same function only while no sequence is longer
    than the window: a window shorter than max_position_embeddings is refused, naming it.

hf_config.py calls this module (what to read, what to refuse, what to write), so it needs no
knowledge of the family it handles. A loaded model remembers its family in
`ModelConfig.hf_family`, which save_pretrained writes back.
"""

from __future__ import annotations

from typing import Any

from .config import ModelConfig
from .errors import AstraiError

FAMILY_ARCHITECTURES = {"mistral": "MistralForCausalLM"}

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
}


class FamilyError(AstraiError):
    """config.json of a Mistral model asks for something we cannot run exactly."""


def _reject(bad: bool, field: str, detail: str) -> None:
    if bad:
        raise FamilyError(f"field {field!r} is {detail}")


# -- config: import -----------------------------------------------------------------------------
def family_fields(model_type: str, d: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields the family sets beyond Llama's, from config.json contents `d` (the
    family's defaults already filled in); refuses what we would compute differently."""
    if model_type == "mistral":
        _check_sliding_window(d)
        _check_act(d, ("silu",))
        return {"hf_family": model_type}
    return {}


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
    llama_like = not (config.attn_bias or config.qk_norm)
    wanted = config.hf_family
    if wanted == "mistral" and llama_like:
        return "mistral"
    return None


def family_hf_fields(model_type: str, config: ModelConfig, fields: dict[str, Any]) -> dict[str, Any]:
    """The config.json fields (Llama's, in `fields`) adjusted for the family."""
    out = dict(fields)
    if model_type == "mistral":
        out["sliding_window"] = None
    return out
