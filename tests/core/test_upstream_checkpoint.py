"""Upstream AstrAI model directories (github ViperEkura/AstrAI, v1.3.9) load through
AutoModel with upstream's logits, and `format="astrai-upstream"` writes them back.

Each test builds its directory itself: config.json in upstream's field names and
model.safetensors with upstream's tensor names, random weights. `upstream_forward` is a
float64 re-implementation of upstream's AutoRegressiveLM.forward, written from its source
(not from our model code):

    x = embed_tokens[ids]
    per layer:  x = x + attention(input_norm(x));  x = x + mlp(post_attention_norm(x))
    logits = lm_head(norm(x))            (embed_tokens when tie_weight is true)

    attention: q/k/v projections; RoPE on interleaved pairs (x0 + i x1, x2 + i x3, ...) with
    base rope_theta * factor ** (d / (d - 2)) for rope_scaling {type: ntk}; then, if use_qk_norm,
    RMSNorm on the rotated q and k; each KV head repeated for n_heads / n_kv_heads query heads;
    causal softmax(q k^T / sqrt(d)) v; if use_gated_attention, times sigmoid(gate(input));
    o_proj.   mlp: down(up(x) * silu(gate(x))).   RMSNorm: x / sqrt(mean(x^2) + eps) * weight.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from astrai.core import upstream_weights
from astrai.core.auto import AutoModel
from astrai.core.checkpoint import CheckpointError
from astrai.core.config import ModelConfig
from astrai.core.rope import rope_frequencies

ATOL = 1e-4  # our float32 model against the float64 reference

# v1.3.9 field -> the name upstream uses after it (Hugging Face style)
HF_NAMES = {
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "dim_ffn": "intermediate_size",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "max_len": "max_position_embeddings",
    "norm_eps": "rms_norm_eps",
    "tie_weight": "tie_word_embeddings",
}


def upstream_config(**overrides) -> dict:
    """A small upstream v1.3.9 config.json: GQA 4:2, three layers, ntk RoPE scaling."""
    data = {
        "model_type": "autoregressive_lm",
        "vocab_size": 97,
        "dim": 64,
        "n_layers": 3,
        "dim_ffn": 96,
        "n_heads": 4,
        "n_kv_heads": 2,
        "max_len": 64,
        "norm_eps": 1e-5,
        "tie_weight": False,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "ntk", "factor": 4.0},
        "attn_type": "gqa",
        "use_qk_norm": False,
        "use_gated_attention": False,
        "ffn_type": "mlp",
        "neftune_alpha": 0.0,
    }
    data.update(overrides)
    return data


def hf_spelled(data: dict) -> dict:
    return {HF_NAMES.get(k, k): v for k, v in data.items()}


def upstream_weights_for(data: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 tensors under upstream's names; norms near 1 but not 1, so a mix-up shows."""
    g = torch.Generator().manual_seed(seed)
    d, f, hd = data["dim"], data["dim_ffn"], data["dim"] // data["n_heads"]
    q, kv = data["n_heads"] * hd, data["n_kv_heads"] * hd

    def w(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    def norm(n):
        return 1.0 + w(n, std=0.2)

    out = {"embed_tokens.weight": w(data["vocab_size"], d, std=1.0), "norm.weight": norm(d)}
    for i in range(data["n_layers"]):
        p = f"layers.{i}."
        out |= {
            p + "attention.q_proj.weight": w(q, d),
            p + "attention.k_proj.weight": w(kv, d),
            p + "attention.v_proj.weight": w(kv, d),
            p + "attention.o_proj.weight": w(d, q),
            p + "input_norm.weight": norm(d),
            p + "post_attention_norm.weight": norm(d),
            p + "mlp.up.weight": w(f, d),
            p + "mlp.gate.weight": w(f, d),
            p + "mlp.down.weight": w(d, f),
        }
        if data.get("use_qk_norm"):
            out |= {p + "attention.q_norm.weight": norm(hd), p + "attention.k_norm.weight": norm(hd)}
        if data.get("use_gated_attention"):
            out[p + "attention.gate.weight"] = w(d, d)
    if not data.get("tie_weight"):
        out["lm_head.weight"] = w(data["vocab_size"], d)
    return out


def write_upstream_dir(path: Path, config: dict, weights: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    save_file(weights, str(path / "model.safetensors"))
    return path


# -- the float64 reference ------------------------------------------------------------------
def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope_interleaved(x, positions, base):
    """x (b, t, heads, d): pairs (x[2j], x[2j+1]) rotated by position * base^(-2j/d)."""
    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = positions[:, :, None, None].double() * theta
    cos, sin = angle.cos(), angle.sin()
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def rope_base(data: dict, head_dim: int) -> float:
    base = data.get("rope_theta") or 10000.0
    scaling = data.get("rope_scaling")
    if scaling is not None and scaling.get("type", "ntk") == "ntk":
        base = base * scaling.get("factor", 1.0) ** (head_dim / (head_dim - 2))
    return base


def attention(x, w, p, data, positions):
    b, t, _ = x.shape
    heads, kv_heads = data["n_heads"], data["n_kv_heads"]
    hd = data["dim"] // heads
    q = (x @ w[p + "q_proj.weight"].T).view(b, t, heads, hd)
    k = (x @ w[p + "k_proj.weight"].T).view(b, t, kv_heads, hd)
    v = (x @ w[p + "v_proj.weight"].T).view(b, t, kv_heads, hd)
    base = rope_base(data, hd)
    q, k = rope_interleaved(q, positions, base), rope_interleaved(k, positions, base)
    if data.get("use_qk_norm"):
        q = rms_norm(q, w[p + "q_norm.weight"], data["norm_eps"])
        k = rms_norm(k, w[p + "k_norm.weight"], data["norm_eps"])
    k = k.repeat_interleave(heads // kv_heads, dim=2)
    v = v.repeat_interleave(heads // kv_heads, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    future = torch.ones(t, t, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(future, float("-inf")).softmax(-1)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, heads * hd)
    if data.get("use_gated_attention"):
        out = out * torch.sigmoid(x @ w[p + "gate.weight"].T)
    return out @ w[p + "o_proj.weight"].T


def mlp(x, w, p):
    up, gate = x @ w[p + "up.weight"].T, x @ w[p + "gate.weight"].T
    return (up * torch.nn.functional.silu(gate)) @ w[p + "down.weight"].T


def upstream_forward(data: dict, weights: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Upstream AstrAI's logits for `ids` in float64 (v1.3.9 field names in `data`)."""
    w = {k: v.double() for k, v in weights.items()}
    eps = data["norm_eps"]
    positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    x = w["embed_tokens.weight"][ids]
    for i in range(data["n_layers"]):
        p = f"layers.{i}."
        x = x + attention(rms_norm(x, w[p + "input_norm.weight"], eps), w, p + "attention.", data, positions)
        x = x + mlp(rms_norm(x, w[p + "post_attention_norm.weight"], eps), w, p + "mlp.")
    head = w["embed_tokens.weight"] if data.get("tie_weight") else w["lm_head.weight"]
    return rms_norm(x, w["norm.weight"], eps) @ head.T


def token_ids(data: dict) -> torch.Tensor:
    return torch.randint(0, data["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))


def our_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


# -- loading ----------------------------------------------------------------------------------
VARIANTS = {
    "gqa_ntk_untied": ({}, False),
    "qk_norm_gated_tied": ({"use_qk_norm": True, "use_gated_attention": True, "tie_weight": True}, False),
    "null_model_type_no_scaling": ({"model_type": None, "rope_scaling": None, "rope_theta": None}, False),
    "hugging_face_field_names": ({"use_qk_norm": True}, True),
}


def variant_dir(tmp_path: Path, variant: str) -> tuple[dict, dict, Path]:
    """(v1.3.9 config, upstream weights, the directory written in the variant's spelling)."""
    overrides, hf = VARIANTS[variant]
    data = upstream_config(**overrides)
    weights = upstream_weights_for(data)
    on_disk = hf_spelled(data) if hf else data
    return data, weights, write_upstream_dir(tmp_path / variant, on_disk, weights)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_an_upstream_directory_loads_with_the_logits_of_upstreams_forward(tmp_path, variant):
    data, weights, path = variant_dir(tmp_path, variant)
    model = AutoModel.from_pretrained(path)
    ids = token_ids(data)
    ours = our_logits(model, ids)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), upstream_forward(data, weights, ids), rtol=0, atol=ATOL)


def test_the_rope_pairing_and_the_ntk_base_both_change_the_logits(tmp_path, monkeypatch):
    """The comparison above has teeth: skipping the q/k row permutation, or the ntk base,
    moves the logits far past the tolerance."""
    data, weights, path = variant_dir(tmp_path, "gqa_ntk_untied")
    ids = token_ids(data)
    reference = upstream_forward(data, weights, ids)
    unscaled = upstream_forward({**data, "rope_scaling": None}, weights, ids)
    assert (reference - unscaled).abs().max() > 100 * ATOL
    monkeypatch.setattr(upstream_weights, "_to_half_pairs", lambda t, heads: t)
    unpermuted = our_logits(AutoModel.from_pretrained(path), ids).double()
    assert (reference - unpermuted).abs().max() > 100 * ATOL


def test_the_loaded_config_says_what_upstream_computes(tmp_path):
    _, _, path = variant_dir(tmp_path, "qk_norm_gated_tied")
    config = AutoModel.from_pretrained(path).config
    assert (config.vocab_size, config.dim, config.n_layers, config.ffn_dim) == (97, 64, 3, 96)
    assert (config.n_heads, config.n_kv_heads, config.head_dim, config.max_len) == (4, 2, 16, 64)
    assert config.rope_scaling == {"type": "ntk", "factor": 4.0}
    assert config.qk_norm and config.qk_norm_after_rope and config.gated_attn and config.tie_embeddings


def test_ntk_scaling_multiplies_the_rope_base_by_factor_to_the_d_over_d_minus_2():
    config = ModelConfig(dim=64, n_heads=4, rope_theta=10000.0, rope_scaling={"type": "ntk", "factor": 4.0})
    base = 10000.0 * 4.0 ** (16 / 14)
    expected = base ** -(torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    inv_freq, attention_scaling = rope_frequencies(config)
    torch.testing.assert_close(inv_freq.double(), expected, rtol=1e-6, atol=0)
    assert attention_scaling == 1.0


# -- saving -----------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_saving_in_upstream_format_writes_the_same_directory_back(tmp_path, variant):
    data, weights, path = variant_dir(tmp_path, variant)
    model = AutoModel.from_pretrained(path)
    out = AutoModel.save_pretrained(model, tmp_path / "saved", format="astrai-upstream")

    written = json.loads((out / "config.json").read_text(encoding="utf-8"))
    original = json.loads((path / "config.json").read_text(encoding="utf-8"))
    expected = {**original, "model_type": "autoregressive_lm"}  # a null model_type is written as upstream's
    if original.get("rope_theta") is None:
        expected["rope_theta"] = 10000.0  # upstream's value for null
    assert written == expected
    stored = load_file(str(out / "model.safetensors"))
    assert stored.keys() == weights.keys()
    assert all(torch.equal(stored[name], weights[name]) for name in weights)

    reloaded = AutoModel.from_pretrained(out)
    ids = token_ids(data)
    assert torch.equal(our_logits(reloaded, ids), our_logits(model, ids))


@pytest.mark.parametrize("arch", ["gqa", "qk_norm_after_rope", "gated"])
@pytest.mark.parametrize("tied", [False, True])
def test_our_model_saved_in_upstream_format_reloads_to_equal_logits(make_model, tmp_path, arch, tied):
    model = make_model(arch, tie_embeddings=tied, rope_scaling={"type": "ntk", "factor": 2.0})
    AutoModel.save_pretrained(model, tmp_path, format="astrai-upstream")
    data = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    assert data["model_type"] == "autoregressive_lm" and data["tie_weight"] is tied
    reloaded = AutoModel.from_pretrained(tmp_path)
    ids = torch.randint(0, 97, (2, 17))
    assert torch.equal(our_logits(reloaded, ids), our_logits(model, ids))


@pytest.mark.parametrize(
    ("arch", "overrides", "field"),
    [
        ("qk_norm", {}, "qk_norm_after_rope"),
        ("bias", {}, "attn_bias"),
        ("mla", {}, "attn_type"),
        ("moe", {}, "ffn_type"),
        ("gqa", {"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.type"),
        ("gqa", {"dim": 32, "n_heads": 4, "head_dim": 16}, "head_dim"),
    ],
)
def test_saving_what_upstream_cannot_express_fails_naming_the_field(make_model, tmp_path, arch, overrides, field):
    model = make_model(arch, **overrides)
    with pytest.raises(CheckpointError, match=f"ModelConfig.{field}.*astrai-upstream"):
        AutoModel.save_pretrained(model, tmp_path, format="astrai-upstream")
    assert not (tmp_path / "config.json").exists()


def test_an_unknown_save_format_is_refused(make_model, tmp_path):
    with pytest.raises(CheckpointError, match="format 'upstream' is not supported"):
        AutoModel.save_pretrained(make_model(), tmp_path, format="upstream")


# -- what cannot load ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("edit", "field"),
    [
        ({"attn_type": "mla", "kv_lora_rank": 16}, "'attn_type' is 'mla'"),
        ({"ffn_type": "moe", "n_routed_experts": 4}, "'ffn_type' is 'moe'"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "'rope_scaling.type' is 'linear'.*set it to 'ntk'"),
        ({"n_kv_heads": None}, "'n_kv_heads' is missing or null"),
        ({"dim_ffn": 96.5}, "'dim_ffn' must be a positive integer, got 96.5"),
        ({"sliding_window": 32}, "'sliding_window' is not a field of upstream"),
        ({"hidden_size": 64}, "'hidden_size' appears beside v1.3.9's"),
        ({"dim": 66}, "'dim' \\(66\\) is not a multiple of n_heads"),
    ],
)
def test_upstream_fields_we_cannot_express_fail_at_load_naming_the_field(tmp_path, edit, field):
    data = upstream_config()
    path = write_upstream_dir(tmp_path, {**data, **edit}, upstream_weights_for(data))
    with pytest.raises(CheckpointError, match=f"config.json: field {field}"):
        AutoModel.from_pretrained(path)


def test_a_pre_v1_3_khaosz_config_says_how_to_rename_its_fields(tmp_path):
    old = {"vocab_size": 97, "n_dim": 64, "n_head": 4, "n_kvhead": 2, "d_ffn": 96, "m_len": 64, "n_layer": 3}
    path = write_upstream_dir(tmp_path, old, {})
    with pytest.raises(CheckpointError, match="pre-v1.3 \\(KHAOSZ\\) field name.*n_dim -> dim"):
        AutoModel.from_pretrained(path)


def test_an_upstream_tensor_we_do_not_know_fails_naming_it(tmp_path):
    data = upstream_config()
    weights = upstream_weights_for(data) | {"layers.0.attention.q_proj.bias": torch.zeros(64)}
    path = write_upstream_dir(tmp_path, data, weights)
    with pytest.raises(CheckpointError, match="unexpected tensor 'layers.0.attention.q_proj.bias'"):
        AutoModel.from_pretrained(path)


def test_an_untied_upstream_directory_without_lm_head_says_which_field_ties_it(tmp_path):
    data = upstream_config()
    weights = upstream_weights_for(data)
    del weights["lm_head.weight"]
    path = write_upstream_dir(tmp_path, data, weights)
    with pytest.raises(CheckpointError, match="missing tensor 'lm_head.weight'.*tie_weight"):
        AutoModel.from_pretrained(path)


# -- the tokenizer beside the weights -------------------------------------------------------
UPSTREAM_SPECIALS = {
    "bos_token": "<|begin_of_sentence|>",
    "eos_token": "<|end_of_sentence|>",
    "pad_token": "<|_pad_|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
}
UPSTREAM_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_an_upstream_tokenizer_config_gives_its_special_tokens_and_chat_template(tmp_path):
    """Upstream keeps its special tokens in one "special_tokens" map and the template inline."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from astrai.core.tokenizer import AutoTokenizer

    words = [*UPSTREAM_SPECIALS.values(), "user", "assistant", "hi", "[UNK]"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(list(UPSTREAM_SPECIALS.values()))
    backend.save(str(tmp_path / "tokenizer.json"))
    config = {"special_tokens": UPSTREAM_SPECIALS, "chat_template": UPSTREAM_TEMPLATE}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")

    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<|begin_of_sentence|>",
        "<|end_of_sentence|>",
        "<|_pad_|>",
    )
    assert tok.stop_token_ids == [1, 4]  # eos and upstream's end of turn, <|im_end|>
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
