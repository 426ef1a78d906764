"""Our model directory: round trips, sharding, dtypes, config.json mapping, and the error messages
for every way a directory can be broken."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from astrai.core.auto import AutoModel
from astrai.core.checkpoint import CheckpointError, load_config, load_pretrained, parse_size, save_pretrained
from astrai.core.config import ModelConfig
from astrai.core.hf_config import from_hf_dict, to_hf_dict
from astrai.core.transformer import CausalLM

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def stored_tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def hand_edited(directory: Path) -> Path:
    """A saved directory about to be edited as another tool would: without checksums.json, whose
    check would otherwise report every edit as damage (tested in test_integrity.py)."""
    (directory / "checksums.json").unlink()
    return directory


def assert_same_weights(a: CausalLM, b: CausalLM) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


# -- round trips -----------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_is_bit_exact(model_arch, make_model, tmp_path, tied):
    model = make_model(model_arch, tie_embeddings=tied, bos_token_id=1, eos_token_id=[2, 3])
    AutoModel.save_pretrained(model, tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert loaded.config == model.config
    assert_same_weights(model, loaded)
    assert not loaded.training
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    rotary = loaded.model.rotary.inv_freq
    assert not rotary.is_meta and torch.equal(rotary, model.model.rotary.inv_freq)
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    files = {p.name for p in tmp_path.iterdir()}
    assert files == {"config.json", "generation_config.json", "model.safetensors", "checksums.json"}
    assert json.loads((tmp_path / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": [2, 3]}


def test_tied_embeddings_are_stored_once(make_model, tmp_path):
    save_pretrained(make_model(tie_embeddings=True), tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names


def test_tied_checkpoint_with_a_matching_lm_head_copy_loads(make_model, tmp_path):
    model = make_model(tie_embeddings=True)
    save_pretrained(model, tmp_path)
    tensors = load_file(hand_edited(tmp_path) / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()  # as some exporters write it
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = load_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'lm_head\.weight' differs"):
        load_pretrained(tmp_path)


def test_sharded_save_writes_an_index_and_reloads(make_model, tmp_path):
    model = make_model("moe", n_layers=3)
    save_pretrained(model, tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    state = model.state_dict()
    assert set(index["weight_map"]) == set(state)
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    for shard in shards:
        with safe_open(tmp_path / shard, "pt") as f:
            names = list(f.keys())
            assert {n for n, s in index["weight_map"].items() if s == shard} == set(names)
            sizes = [f.get_slice(n).get_shape() for n in names]
        nbytes = sum(4 * torch.Size(s).numel() for s in sizes)
        assert nbytes <= 20_000 or len(names) == 1  # only a single oversized tensor may exceed the limit
    assert_same_weights(model, load_pretrained(tmp_path))

    # Saving again unsharded must not leave stale shards behind.
    save_pretrained(model, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]
    assert_same_weights(model, load_pretrained(tmp_path))


@pytest.mark.parametrize(
    ("text", "expected"), [("2GB", 2 * 10**9), ("500MiB", 500 * 2**20), ("1.5kb", 1500), (12345, 12345), ("64 B", 64)]
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["2 parsecs", "GB", "-1GB", 0, "1.2.3MB"])
def test_parse_size_rejects_nonsense(bad):
    with pytest.raises(CheckpointError, match="max_shard_size"):
        parse_size(bad)


# -- dtypes and devices ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, "bf16", "bfloat16", "torch.bfloat16"])
def test_load_as_bf16(make_model, tmp_path, dtype):
    model = make_model("qk_norm", tie_embeddings=True)
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path, dtype=dtype)
    for name, p in loaded.state_dict().items():
        assert p.dtype == torch.bfloat16, name
        assert torch.equal(p, model.state_dict()[name].to(torch.bfloat16)), name
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.isfinite(loaded(torch.randint(0, 97, (1, 5)))).all()


def test_stored_dtype_is_kept_by_default(make_model, tmp_path):
    model = make_model().to(torch.bfloat16)
    save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = load_pretrained(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert_same_weights(model, loaded)
    assert {p.dtype for p in load_pretrained(tmp_path, dtype="float32").parameters()} == {torch.float32}


def test_unknown_dtype_is_rejected(make_model, tmp_path):
    save_pretrained(make_model(), tmp_path)
    with pytest.raises(CheckpointError, match="dtype 'int3' is not supported; use one of"):
        load_pretrained(tmp_path, dtype="int3")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_straight_onto_cuda(make_model, tmp_path):
    model = make_model("mla")
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path, device="cuda", dtype=torch.float32)
    assert all(t.is_cuda for t in [*loaded.parameters(), *loaded.buffers()])
    ids = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids.cuda()).cpu(), model(ids), atol=1e-4, rtol=1e-4)


# -- tokenizer -------------------------------------------------------------------------------
def test_tokenizer_is_saved_alongside(make_model, tmp_path):
    from astrai.core.tokenizer import AutoTokenizer
    from astrai.core.tokenizer_trainer import train_tokenizer

    texts = ["hello world, a tiny corpus", "你好，世界", "the model and the tokenizer travel together"] * 20
    tokenizer = train_tokenizer(iter(texts), vocab_size=300, min_frequency=1, show_progress=False)
    model = make_model(vocab_size=320)  # config without token ids: they come from the tokenizer
    save_pretrained(model, tmp_path, tokenizer=tokenizer)
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in tmp_path.iterdir()}
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.encode("hello 世界") == tokenizer.encode("hello 世界")
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["bos_token_id"] == tokenizer.bos_token_id
    stops = tokenizer.stop_token_ids
    assert generation["eos_token_id"] == (stops[0] if len(stops) == 1 else stops)

    with pytest.raises(CheckpointError, match="tokenizer has .* tokens but config.vocab_size is 97"):
        save_pretrained(make_model(), tmp_path / "small", tokenizer=tokenizer)


# -- config.json -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("arch", "model_type", "architecture"),
    [
        ("gqa", "llama", "LlamaForCausalLM"),
        ("bias", "qwen2", "Qwen2ForCausalLM"),
        ("qk_norm", "qwen3", "Qwen3ForCausalLM"),
        ("gated", "astrai", "AstrAIForCausalLM"),
        ("mla", "astrai", "AstrAIForCausalLM"),
        ("moe", "astrai", "AstrAIForCausalLM"),
    ],
)
def test_config_json_uses_the_hugging_face_architecture_when_it_can(tiny_config, arch, model_type, architecture):
    config = tiny_config(arch, rope_scaling={"type": "linear", "factor": 2.0})
    data = to_hf_dict(config, "float32")
    assert (data["model_type"], data["architectures"]) == (model_type, [architecture])
    if model_type == "astrai":
        assert {k: v for k, v in data.items() if k not in ("model_type", "architectures", "dtype")} == config.to_dict()
    else:
        assert data["astrai"] == config.to_dict()
        assert data["hidden_size"] == 32 and data["num_key_value_heads"] == 2 and data["head_dim"] == 8
        assert data["rope_parameters"] == {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    assert from_hf_dict(json.loads(json.dumps(data))) == config


def test_both_ecosystems_attention_bias_rules(tiny_config):
    """Our attn_bias is q/k/v only (Qwen2); with qk-norm there is no Hugging Face equivalent."""
    assert to_hf_dict(tiny_config(attn_bias=True, qk_norm=True))["model_type"] == "astrai"
    assert (
        to_hf_dict(tiny_config(dim=34, n_heads=4, head_dim=8))["model_type"] == "astrai"
    )  # Llama needs dim % heads == 0


def test_edited_hugging_face_fields_win_over_the_astrai_copy(tiny_config, tmp_path):
    data = to_hf_dict(tiny_config("qk_norm", eos_token_id=5), "float32")
    data["max_position_embeddings"], data["eos_token_id"] = 128, [5, 6]  # as a Hub tool would edit them
    config = from_hf_dict(data)
    assert (config.max_len, config.eos_token_id, config.qk_norm, config.init_std) == (128, [5, 6], True, 0.2)


def test_transformers_4_style_rope_fields():
    data = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 50,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "rope_theta": 5e5,
        "rope_scaling": {"type": "linear", "factor": 2.0},
        "tie_word_embeddings": True,
    }
    config = from_hf_dict(data)
    assert (config.rope_theta, config.rope_scaling, config.n_kv_heads, config.head_dim) == (
        5e5,
        {"type": "linear", "factor": 2.0},
        4,
        8,
    )
    assert (config.bos_token_id, config.eos_token_id, config.max_len) == (1, 2, 2048)  # LlamaConfig's defaults


# config.json files as published on the Hugging Face Hub (transformers 4.x layout).
PUBLISHED = {
    "qwen2.5-0.5b.json": {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "hidden_act": "silu",
        "hidden_size": 896,
        "initializer_range": 0.02,
        "intermediate_size": 4864,
        "max_position_embeddings": 32768,
        "max_window_layers": 24,
        "model_type": "qwen2",
        "num_attention_heads": 14,
        "num_hidden_layers": 24,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.40.1",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
    },
    "qwen3-0.6b.json": {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 1024,
        "initializer_range": 0.02,
        "intermediate_size": 3072,
        "max_position_embeddings": 40960,
        "max_window_layers": 28,
        "model_type": "qwen3",
        "num_attention_heads": 16,
        "num_hidden_layers": 28,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
    },
    "tinyllama-1.1b.json": {
        "architectures": ["LlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 5632,
        "max_position_embeddings": 2048,
        "model_type": "llama",
        "num_attention_heads": 32,
        "num_hidden_layers": 22,
        "num_key_value_heads": 4,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 32000,
    },
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_configs_map_to_our_shipped_shapes(name):
    ours = ModelConfig.from_json(Path(__file__).resolve().parents[2] / "configs" / "model" / name).to_dict()
    theirs = from_hf_dict(PUBLISHED[name]).to_dict()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "extra"):  # ours leave ids to the tokenizer
        ours.pop(key), theirs.pop(key)
    assert theirs == ours


# -- broken directories ----------------------------------------------------------------------
@pytest.fixture
def saved(make_model, tmp_path):
    """A saved tiny untied GQA model (q_proj is 32 x 32)."""
    model = make_model()
    save_pretrained(model, tmp_path / "m")
    return tmp_path / "m"


def error_of(path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as err:
        load_pretrained(path, **kwargs)
    return str(err.value)


def test_missing_directory(tmp_path):
    assert "nowhere: model directory not found" in error_of(tmp_path / "nowhere")


def test_missing_config_json(saved):
    (saved / "config.json").unlink()
    assert "config.json: not found" in error_of(saved)


def test_malformed_config_json(saved):
    (saved / "config.json").write_text("{ not json")
    assert "config.json: not valid JSON" in error_of(saved)


def test_bad_field_in_config_json(saved):
    data = json.loads((saved / "config.json").read_text())
    data["num_key_value_heads"] = 3
    (saved / "config.json").write_text(json.dumps(data))
    message = error_of(saved)
    assert "config.json" in message and "n_kv_heads" in message


def test_missing_weights_file(saved):
    (saved / "model.safetensors").rename(saved / "pytorch_model.bin")
    message = error_of(saved)
    assert "no model.safetensors or model.safetensors.index.json" in message
    assert "pytorch_model.bin" in message and "convert" in message


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_weights_file(saved, damage):
    file = saved / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00\x01 not a safetensors file" * 10)
    message = error_of(saved)
    assert "model.safetensors: not a readable safetensors file" in message
    assert "corrupt or truncated" in message


def test_missing_tensor(saved):
    tensors = load_file(hand_edited(saved) / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, saved / "model.safetensors", metadata={"format": "pt"})
    assert "model.safetensors: missing tensor 'model.layers.1.mlp.up_proj.weight'" in error_of(saved)


def test_missing_untied_head_hints_at_tying(saved):
    tensors = load_file(hand_edited(saved) / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, saved / "model.safetensors", metadata={"format": "pt"})
    message = error_of(saved)
    assert "model.safetensors: missing tensor 'lm_head.weight'" in message and "tie_word_embeddings" in message


def test_bad_shard_size_writes_nothing(make_model, tmp_path):
    with pytest.raises(CheckpointError, match="max_shard_size"):
        save_pretrained(make_model(), tmp_path / "out", max_shard_size="lots")
    assert not (tmp_path / "out").exists()


def test_unexpected_tensor(saved):
    tensors = load_file(saved / "model.safetensors")
    tensors["model.layers.2.mlp.up_proj.weight"] = torch.zeros(48, 32)  # a third layer the config lacks
    save_file(tensors, saved / "model.safetensors", metadata={"format": "pt"})
    assert "model.safetensors: unexpected tensor 'model.layers.2.mlp.up_proj.weight'" in error_of(saved)


def test_shape_mismatch(saved):
    tensors = load_file(saved / "model.safetensors")
    tensors[Q_PROJ] = torch.zeros(32, 16)
    save_file(tensors, saved / "model.safetensors", metadata={"format": "pt"})
    assert error_of(saved) == (
        f"model.safetensors: tensor '{Q_PROJ}' has shape (32, 16) but the config expects (32, 32)"
    )


def test_missing_shard(make_model, tmp_path):
    save_pretrained(make_model(), tmp_path, max_shard_size="8KB")
    second = sorted(tmp_path.glob("model-*.safetensors"))[1]
    second.unlink()
    assert f"{second.name}: not found" in error_of(tmp_path)


def test_index_lists_a_tensor_its_shard_lacks(make_model, tmp_path):
    save_pretrained(make_model(), tmp_path, max_shard_size="8KB")
    index = json.loads((hand_edited(tmp_path) / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["model.norm.weight"] = first  # it really is in the last shard
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    message = error_of(tmp_path)
    assert f"{first}: tensor 'model.norm.weight' is listed in model.safetensors.index.json" in message


def test_malformed_index(make_model, tmp_path):
    save_pretrained(make_model(), tmp_path, max_shard_size="8KB")
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    assert "model.safetensors.index.json: not a valid index" in error_of(tmp_path)


def test_unknown_architecture_names_the_supported_ones(saved):
    data = json.loads((saved / "config.json").read_text())
    data.update(model_type="falcon", architectures=["FalconForCausalLM"])
    (saved / "config.json").write_text(json.dumps(data))
    message = error_of(saved)
    assert "FalconForCausalLM" in message
    for supported in ("AstrAIForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"):
        assert supported in message


@pytest.mark.parametrize(
    ("field", "value"),
    [("attention_bias", True), ("mlp_bias", True), ("hidden_act", "gelu"), ("partial_rotary_factor", 0.5)],
)
def test_unsupported_hugging_face_options_are_refused(saved, field, value):
    data = json.loads((saved / "config.json").read_text())
    data[field] = value
    data.pop("astrai")
    (saved / "config.json").write_text(json.dumps(data))
    message = error_of(saved)
    assert "config.json" in message and repr(field) in message


def test_load_config_reads_without_weights(saved):
    (saved / "model.safetensors").unlink()
    config = load_config(saved)
    assert (config.dim, config.n_layers) == (32, 2)


def test_saving_a_meta_model_is_refused(tiny_config, tmp_path):
    with torch.device("meta"):
        model = CausalLM(tiny_config())
    with pytest.raises(CheckpointError, match="meta device"):
        save_pretrained(model, tmp_path)
