"""Hugging Face interop, checked against transformers itself (float32, logits within 1e-4).

- a Llama / Qwen2 / Qwen3 model saved by transformers loads into our CausalLM;
- our save_pretrained loads into transformers.AutoModelForCausalLM as the right class.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from hf_helpers import ATOL, TINY

from astrai.core.auto import AutoModel
from astrai.core.checkpoint import save_pretrained

HF_CONFIGS = {
    "llama": lambda **kw: transformers.LlamaConfig(
        **TINY, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **kw
    ),
    "qwen2": lambda **kw: transformers.Qwen2Config(
        **TINY, rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **kw
    ),
    "qwen3": lambda **kw: transformers.Qwen3Config(
        **TINY, head_dim=24, rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **kw
    ),
    "llama-llama3-rope": lambda **kw: transformers.LlamaConfig(
        **TINY,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        **kw,
    ),
    "qwen3-yarn-rope": lambda **kw: transformers.Qwen3Config(
        **TINY,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        **kw,
    ),
}


def randomize_hf(model: torch.nn.Module) -> torch.nn.Module:
    """Every weight random and O(1) logits; norms near 1 so a norm/bias mix-up would show."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
    return model.eval()


def batches():
    """A padding-free batch, and a left-padded one with its attention mask and position ids."""
    ids = torch.randint(3, 128, (3, 20))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    mask[1, :2] = 0
    padded = ids.masked_fill(mask == 0, 0)
    return ids, (padded, mask, (mask.cumsum(-1) - 1).clamp(min=0))


def assert_same_logits(ours, theirs):
    ids, (padded, mask, pos) = batches()
    with torch.no_grad():
        a, b = ours(ids), theirs(input_ids=ids).logits
        assert b.abs().max() > 1.0  # meaningful logits
        assert (a - b).abs().max().item() < ATOL
        a = ours(padded, position_ids=pos, attention_mask=mask)
        b = theirs(input_ids=padded, position_ids=pos, attention_mask=mask).logits
        real = mask.bool()
        assert (a[real] - b[real]).abs().max().item() < ATOL


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("kind", list(HF_CONFIGS))
def test_transformers_checkpoint_loads_into_our_model(tmp_path, kind, tied, attn):
    config = HF_CONFIGS[kind](tie_word_embeddings=tied)
    theirs = randomize_hf(transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn))
    theirs.save_pretrained(tmp_path, max_shard_size="100KB")  # sharded, with transformers' own index
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = AutoModel.from_pretrained(tmp_path, dtype=torch.float32)
    assert ours.config.tie_embeddings == tied
    assert ours.config.qk_norm == kind.startswith("qwen3") and ours.config.attn_bias == (kind == "qwen2")
    assert (ours.config.bos_token_id, ours.config.eos_token_id, ours.config.pad_token_id) == (1, 2, 0)
    assert_same_logits(ours, theirs)


OUR_SHAPES = {
    "LlamaForCausalLM": {},
    "Qwen2ForCausalLM": {"attn_bias": True, "tie_embeddings": True},
    "Qwen3ForCausalLM": {"qk_norm": True, "head_dim": 24, "tie_embeddings": True},
    "LlamaForCausalLM-linear": {"rope_scaling": {"type": "linear", "factor": 4.0}},
    "LlamaForCausalLM-llama3": {
        "rope_scaling": {
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        "rope_theta": 500000.0,
    },
    "Qwen3ForCausalLM-yarn": {
        "qk_norm": True,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    },
}


@pytest.mark.parametrize("shape", list(OUR_SHAPES))
def test_our_checkpoint_loads_into_transformers(tmp_path, make_model, shape):
    ours = make_model(
        vocab_size=128,
        dim=64,
        ffn_dim=96,
        max_len=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **OUR_SHAPES[shape],
    )
    save_pretrained(ours, tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(theirs).__name__ == shape.split("-")[0]
    assert theirs.config.tie_word_embeddings == ours.config.tie_embeddings
    assert_same_logits(ours, theirs)
    # and back: transformers' re-save keeps our full config under "astrai"
    theirs.save_pretrained(tmp_path / "again")
    assert AutoModel.from_pretrained(tmp_path / "again").config == ours.config


def test_greedy_generation_matches_transformers(tmp_path, make_model):
    """Our model decoding token by token with a cache picks the same tokens as transformers' generate."""
    from astrai.core.kv_cache_view import ContiguousKVCache

    ours = make_model(vocab_size=128, dim=64, ffn_dim=96, max_len=128, qk_norm=True, eos_token_id=None)
    save_pretrained(ours, tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompt = torch.randint(3, 128, (1, 8))
    with torch.no_grad():
        expected = theirs.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        cache = ContiguousKVCache(ours.kv_layout())
        tokens, step = prompt, prompt
        for _ in range(12):
            start = tokens.shape[1] - step.shape[1]
            pos = torch.arange(start, tokens.shape[1])[None]
            step = ours(step, position_ids=pos, cache=cache)[:, -1:].argmax(-1)
            tokens = torch.cat([tokens, step], dim=1)
    assert torch.equal(tokens, expected)
