"""Mistral, Phi-3 and Gemma directories, checked against transformers itself (float32).

For each family a random small model built with transformers' own class is saved; our
AutoModel loads it with logits within 1e-4, our paged engine decodes it greedily to the tokens
of transformers' generate, and our save_pretrained writes it back as a directory transformers
loads as the same class with the same logits. What our config cannot express fails at load,
naming the field.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import transformers
from hf_helpers import ATOL, TINY, assert_engine_greedy_equals_generate
from safetensors import safe_open

from astrai.core.auto import AutoModel
from astrai.core.checkpoint import CheckpointError, save_pretrained
from astrai.core.hf_config import to_hf_dict

VOCAB = 128


def _rope(theta: float) -> dict:
    return {"rope_type": "default", "rope_theta": theta}


FAMILIES = {
    "mistral": lambda **kw: transformers.MistralConfig(
        **{**TINY, "head_dim": 24, "sliding_window": None, "rope_parameters": _rope(1e6), **kw}
    ),
    "phi3": lambda **kw: transformers.Phi3Config(**{**TINY, "rope_parameters": _rope(10000.0), **kw}),
    "gemma": lambda **kw: transformers.GemmaConfig(**{**TINY, "head_dim": 24, "rope_parameters": _rope(10000.0), **kw}),
}
CLASSES = {
    "mistral": "MistralForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma": "GemmaForCausalLM",
}
# What each family's config becomes in ours, beyond Llama's fields.
MAPPED = {
    "mistral": {"head_dim": 24},
    "phi3": {"head_dim": 16},  # Phi-3's is hidden_size // num_attention_heads
    "gemma": {"head_dim": 24, "mlp_act": "gelu_tanh", "scale_embeddings": True},
}


def randomize_hf(model: torch.nn.Module, family: str) -> torch.nn.Module:
    """Every weight random with O(1) logits; norms scale by about 1 (Gemma stores them minus 1)."""
    centre = 0.0 if family == "gemma" else 1.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(centre + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
    return model.eval()


def hf_model(family: str, path, **kw) -> torch.nn.Module:
    """A random transformers model of `family`, saved to `path`."""
    config = FAMILIES[family](**kw)
    model = randomize_hf(transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager"), family)
    model.save_pretrained(path)
    return model


def assert_same_logits(ours, theirs):
    """Equal logits on a padding-free batch and on a left-padded one."""
    ids = torch.randint(3, VOCAB, (3, 20))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    mask[1, :2] = 0
    padded, pos = ids.masked_fill(mask == 0, 0), (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a, b = ours(ids), theirs(input_ids=ids).logits
        assert b.abs().max() > 1.0  # meaningful logits
        assert (a - b).abs().max().item() < ATOL
        a = ours(padded, position_ids=pos, attention_mask=mask)
        b = theirs(input_ids=padded, position_ids=pos, attention_mask=mask).logits
        assert (a[mask.bool()] - b[mask.bool()]).abs().max().item() < ATOL


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_transformers_directory_of_each_family_loads_with_equal_logits(tmp_path, family, tied):
    theirs = hf_model(family, tmp_path, tie_word_embeddings=tied)
    ours = AutoModel.from_pretrained(tmp_path, dtype=torch.float32)
    assert ours.config.hf_family == family and ours.config.tie_embeddings == tied
    assert {k: getattr(ours.config, k) for k in MAPPED[family]} == MAPPED[family]
    assert_same_logits(ours, theirs)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_output_of_our_engine_equals_transformers_generate(tmp_path, family):
    torch.manual_seed(11)
    theirs = hf_model(family, tmp_path)
    ours = AutoModel.from_pretrained(tmp_path, dtype=torch.float32)
    g = torch.Generator().manual_seed(12)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (3, 9, 14, 21)]
    assert_engine_greedy_equals_generate(ours, theirs, prompts, num_pages=16)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_our_export_reloads_in_transformers_as_the_same_class_with_equal_logits(tmp_path, family):
    theirs = hf_model(family, tmp_path / "hf")
    ours = AutoModel.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    save_pretrained(ours, tmp_path / "out")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(again).__name__ == CLASSES[family]
    assert_same_logits(ours, again)
    assert_same_logits(AutoModel.from_pretrained(tmp_path / "out"), theirs)
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as f:
        ours_on_disk = set(f.keys())
    with safe_open(tmp_path / "hf" / "model.safetensors", framework="pt") as f:
        assert ours_on_disk == set(f.keys())  # Phi-3's fused qkv_proj / gate_up_proj, by their names


def test_a_gemma_shaped_model_of_ours_exports_as_gemma(tmp_path, make_model):
    ours = make_model(
        vocab_size=VOCAB, dim=64, ffn_dim=96, head_dim=24, max_len=128, mlp_act="gelu_tanh", scale_embeddings=True
    )
    save_pretrained(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gemma"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(theirs).__name__ == "GemmaForCausalLM"
    assert_same_logits(ours, theirs)
    assert AutoModel.from_pretrained(tmp_path).config == ours.config


def test_the_family_is_kept_only_while_its_class_runs_the_architecture(tiny_config):
    assert to_hf_dict(tiny_config(hf_family="mistral"))["model_type"] == "mistral"
    assert to_hf_dict(tiny_config(hf_family="phi3"))["model_type"] == "phi3"
    assert to_hf_dict(tiny_config(hf_family="phi3", head_dim=16))["model_type"] == "llama"  # Phi-3: dim / heads
    assert to_hf_dict(tiny_config("qk_norm", hf_family="mistral"))["model_type"] == "qwen3"
    assert to_hf_dict(tiny_config(mlp_act="gelu_tanh"))["model_type"] == "astrai"  # no embedding scale: no Gemma


def test_mistral_with_a_window_shorter_than_its_sequences_matches_transformers_in_logits_engine_and_export(tmp_path):
    torch.manual_seed(5)
    theirs = hf_model("mistral", tmp_path / "hf", sliding_window=6)  # shorter than every test sequence
    ours = AutoModel.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert (ours.config.sliding_window, ours.config.layer_types) == (6, None)
    assert_same_logits(ours, theirs)
    without = AutoModel.from_config(dataclasses.replace(ours.config, sliding_window=None), dtype=torch.float32)
    without.load_state_dict(ours.state_dict())
    ids = torch.randint(3, VOCAB, (1, 20))
    with torch.no_grad():
        assert (without(ids) - ours(ids)).abs().max() > 1e-2  # the window matters at this length
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (3, 9, 14, 21)]
    assert_engine_greedy_equals_generate(ours, theirs, prompts, num_pages=24)
    save_pretrained(ours, tmp_path / "out")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(again).__name__ == "MistralForCausalLM" and again.config.sliding_window == 6
    assert_same_logits(ours, again)


def test_mistral_with_a_window_as_long_as_its_context_loads(tmp_path):
    theirs = hf_model("mistral", tmp_path, sliding_window=128)
    assert_same_logits(AutoModel.from_pretrained(tmp_path, dtype=torch.float32), theirs)


def test_phi3_with_sliding_window_or_partial_rotary_is_refused_naming_the_field(tmp_path):
    FAMILIES["phi3"](sliding_window=64).save_pretrained(tmp_path / "window")
    with pytest.raises(CheckpointError, match="'sliding_window'"):
        AutoModel.from_pretrained(tmp_path / "window")
    config = FAMILIES["phi3"]()
    config.rope_parameters["partial_rotary_factor"] = 0.5
    config.save_pretrained(tmp_path / "partial")
    with pytest.raises(CheckpointError, match="partial_rotary_factor"):
        AutoModel.from_pretrained(tmp_path / "partial")


def test_gemma_with_attention_biases_or_another_activation_is_refused_naming_the_field(tmp_path):
    FAMILIES["gemma"](attention_bias=True).save_pretrained(tmp_path / "bias")
    with pytest.raises(CheckpointError, match="'attention_bias'"):
        AutoModel.from_pretrained(tmp_path / "bias")
    FAMILIES["gemma"](hidden_act="relu").save_pretrained(tmp_path / "act")
    with pytest.raises(CheckpointError, match="'hidden_act' is 'relu'"):
        AutoModel.from_pretrained(tmp_path / "act")
