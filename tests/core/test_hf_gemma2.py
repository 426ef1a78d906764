"""Gemma 2 directories, checked against transformers itself (float32).

A random small Gemma2ForCausalLM with a sliding window (8) shorter than the prompts (20-40 tokens),
alternating sliding / full layers, soft-capped attention and output logits and an attention scale
of its own is saved with save_pretrained; our AutoModel loads it with logits within 1e-4, our paged
engine decodes it greedily (chunked prefill, decode past the window, a prefix-cache hit) to the
tokens of transformers' generate, and our save_pretrained writes it back as a Gemma2ForCausalLM
directory. What our config cannot express fails at load, naming the field.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from hf_helpers import ATOL, TINY
from safetensors import safe_open

from astrai.core.auto import AutoModel
from astrai.core.checkpoint import CheckpointError, save_pretrained
from astrai.core.config import ConfigError, ModelConfig
from astrai.core.engine import InferenceEngine, SamplingParams
from astrai.core.errors import AstraiError

VOCAB, WINDOW = 128, 8
# Three layers: sliding, full, sliding (Gemma2Config's default pattern).
GEMMA2 = {
    **TINY,
    "num_hidden_layers": 3,
    "head_dim": 24,
    "sliding_window": WINDOW,
    "query_pre_attn_scalar": 20,
    "attn_logit_softcapping": 2.0,  # small enough to bend the O(1) scores of a random model
    "final_logit_softcapping": 5.0,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}


def gemma2_dir(path, **overrides) -> torch.nn.Module:
    """A random transformers Gemma 2 saved to `path`; norms scale by about 1 (stored minus 1)."""
    config = transformers.Gemma2Config(**{**GEMMA2, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(0.2 * torch.randn_like(p)) if name.endswith("norm.weight") else p.normal_(0.0, 0.2)
    model.eval().save_pretrained(path)
    return model


def logits_gap(ours, theirs) -> float:
    """Largest logit difference on a 40-token batch and on a left-padded one (real tokens only)."""
    ids = torch.randint(3, VOCAB, (3, 40))
    mask = torch.ones_like(ids)
    mask[0, :13] = 0
    mask[1, :2] = 0
    padded, pos = ids.masked_fill(mask == 0, 0), (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        plain = (ours(ids) - theirs(input_ids=ids).logits).abs().max()
        a = ours(padded, position_ids=pos, attention_mask=mask)
        b = theirs(input_ids=padded, position_ids=pos, attention_mask=mask).logits
    return max(plain.item(), (a - b)[mask.bool()].abs().max().item())


@pytest.mark.parametrize("tied", [True, False])
def test_a_transformers_gemma2_directory_loads_with_equal_logits(tmp_path, tied):
    theirs = gemma2_dir(tmp_path, tie_word_embeddings=tied)
    ours = AutoModel.from_pretrained(tmp_path, dtype=torch.float32)
    c = ours.config
    assert (c.hf_family, c.sandwich_norm, c.scale_embeddings, c.mlp_act, c.tie_embeddings) == (
        "gemma2",
        True,
        True,
        "gelu_tanh",
        tied,
    )
    assert (c.sliding_window, c.attn_logit_softcap, c.final_logit_softcap, c.query_pre_attn_scalar) == (8, 2.0, 5.0, 20)
    assert [c.layer_window(i) for i in range(3)] == [8, None, 8]
    assert logits_gap(ours, theirs) < ATOL


def test_each_gemma2_addition_changes_the_logits_so_the_parity_test_sees_it(tmp_path):
    """Turning off the window, either soft-cap or the attention scale moves the logits far past 1e-4."""
    theirs = gemma2_dir(tmp_path)
    ours = AutoModel.from_pretrained(tmp_path, dtype=torch.float32)
    attn = [layer.self_attn for layer in ours.model.layers]
    edits = {
        "window": lambda on: [setattr(a, "window", WINDOW if on and i != 1 else None) for i, a in enumerate(attn)],
        "softcap": lambda on: [setattr(a, "softcap", 2.0 if on else None) for a in attn],
        "scale": lambda on: [setattr(a, "scale", (20 if on else 24) ** -0.5) for a in attn],
        "final": lambda on: setattr(ours.config, "final_logit_softcap", 5.0 if on else None),
    }
    for name, edit in edits.items():
        edit(False)
        assert logits_gap(ours, theirs) > 1e-2, name
        edit(True)
    assert logits_gap(ours, theirs) < ATOL


def test_engine_greedy_output_equals_transformers_generate_past_the_window_and_on_a_prefix_hit(tmp_path):
    """Prompts of 20-40 tokens prefill in chunks of at most 16 tokens and decode 20 more, far past
    the window of 8; the second round shares long prefixes with the first, so it starts from
    cached pages and prefills only the rest."""
    torch.manual_seed(11)
    theirs = gemma2_dir(tmp_path)
    ours = AutoModel.from_pretrained(tmp_path, dtype=torch.float32)
    engine = InferenceEngine(ours, None, max_batch_size=3, max_num_batched_tokens=16, page_size=4, num_pages=96)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    g = torch.Generator().manual_seed(12)
    first = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (20, 31, 40)]
    second = [first[0][:17] + [5, 6, 7], first[2][:36] + [9, 10, 11, 12, 13]]
    for prompts in (first, second):
        completions = engine.generate(prompts, params)
        with torch.no_grad():
            for prompt, completion in zip(prompts, completions):
                expected = theirs.generate(
                    torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0
                )[0, len(prompt) :].tolist()
                assert completion.token_ids == expected
    assert engine.stats()["prefix_cache_hit_rate"] > 0.3


def test_our_gemma2_export_reloads_in_transformers_as_gemma2_with_equal_logits(tmp_path):
    theirs = gemma2_dir(tmp_path / "hf")
    ours = AutoModel.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    save_pretrained(ours, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == "gemma2" and written["layer_types"] == theirs.config.layer_types
    again = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    assert type(again).__name__ == "Gemma2ForCausalLM"
    assert logits_gap(ours, again) < ATOL
    assert logits_gap(AutoModel.from_pretrained(tmp_path / "out"), theirs) < ATOL
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as f:
        ours_on_disk = set(f.keys())
    with safe_open(tmp_path / "hf" / "model.safetensors", framework="pt") as f:
        assert ours_on_disk == set(f.keys())  # the four norms per block, by transformers' names


def test_a_gemma2_shaped_model_of_ours_exports_as_gemma2_and_one_without_its_norms_as_astrai(tmp_path, make_model):
    gemma2 = dict(mlp_act="gelu_tanh", scale_embeddings=True, sliding_window=4, attn_logit_softcap=3.0, head_dim=16)
    ours = make_model(
        vocab_size=VOCAB, sandwich_norm=True, layer_types=["sliding_attention", "full_attention"], **gemma2
    )
    save_pretrained(ours, tmp_path / "g2")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "g2", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    assert type(theirs).__name__ == "Gemma2ForCausalLM"
    assert logits_gap(ours, theirs) < ATOL
    assert AutoModel.from_pretrained(tmp_path / "g2").config == ours.config
    # Soft-caps and a window on a Llama-style block: no transformers class runs it, our format does.
    plain = make_model(vocab_size=VOCAB, sliding_window=4, attn_logit_softcap=3.0, final_logit_softcap=4.0)
    save_pretrained(plain, tmp_path / "astrai")
    assert json.loads((tmp_path / "astrai" / "config.json").read_text())["model_type"] == "astrai"
    assert AutoModel.from_pretrained(tmp_path / "astrai").config == plain.config


@pytest.mark.parametrize(
    "edit,field",
    [
        ({"layer_types": ["sliding_attention", "chunked_attention", "full_attention"]}, "'layer_types'.*chunked"),
        ({"layer_types": ["sliding_attention", "full_attention"]}, "'layer_types'.*one entry per layer"),
        ({"hidden_activation": "gelu"}, "'hidden_activation' is 'gelu'"),
        ({"attention_bias": True}, "'attention_bias'"),
        ({"use_bidirectional_attention": True}, "'use_bidirectional_attention'"),
    ],
)
def test_gemma2_fields_we_cannot_express_fail_at_load_naming_the_field(tmp_path, edit, field):
    path = tmp_path / "model"
    transformers.Gemma2Config(**GEMMA2).save_pretrained(path)
    data = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**data, **edit}))
    with pytest.raises(CheckpointError, match=field):
        AutoModel.from_pretrained(path)


def test_model_config_refuses_sliding_layers_without_a_window_naming_layer_types():
    with pytest.raises(ConfigError, match="ModelConfig.layer_types.*sliding_window is null"):
        ModelConfig(n_layers=2, layer_types=["sliding_attention", "full_attention"])
    with pytest.raises(ConfigError, match="ModelConfig.layer_types"):
        ModelConfig(n_layers=2, sliding_window=4, layer_types=["sliding_attention"])
    with pytest.raises(ConfigError, match="ModelConfig.attn_logit_softcap"):
        ModelConfig(attn_logit_softcap=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_engine_with_the_triton_kernel_and_graphs_follows_transformers_past_the_window(tmp_path):
    """On CUDA: the Triton kernel's windows and soft-caps, in decode and prefill graphs, against
    transformers recomputing every step; TF32 moves logits by ~1e-3, so a token must match where the
    reference's choice is clear and its log-prob everywhere."""
    theirs = gemma2_dir(tmp_path).cuda()
    ours = AutoModel.from_pretrained(tmp_path, dtype=torch.float32).cuda()
    engine = InferenceEngine(ours, None, max_batch_size=4, max_num_batched_tokens=32, page_size=16, num_pages=32)
    g = torch.Generator().manual_seed(13)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (20, 33, 40, 27)]
    completions = engine.generate(prompts, SamplingParams(max_tokens=20, temperature=0, logprobs=1, ignore_eos=True))
    with torch.no_grad():
        for prompt, c in zip(prompts, completions):
            ids = list(prompt)
            for token, lp in zip(c.token_ids, c.samples[0].logprobs):
                ref = torch.log_softmax(theirs(input_ids=torch.tensor([ids], device="cuda")).logits[0, -1].double(), -1)
                top2 = ref.topk(2).values
                if top2[0] - top2[1] > 0.02:
                    assert token == int(ref.argmax())
                assert abs(lp.logprob - float(ref[token])) < 1e-2
                ids.append(token)


def test_upstream_format_refuses_a_gemma2_model_naming_the_field(tmp_path, make_model):
    ours = make_model(vocab_size=VOCAB, sliding_window=4)
    with pytest.raises(AstraiError, match="ModelConfig.sliding_window"):
        save_pretrained(ours, tmp_path, format="astrai-upstream")
