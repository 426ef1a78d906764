"""A model directory that was damaged after it was written is refused, naming the file: the
checksum manifest (checksums.json) written with it, atomic writes, and the NaN/Inf check that
also guards directories without a manifest (Hugging Face downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from astrai.core.checkpoint import CheckpointError, load_config, load_pretrained, save_pretrained
from astrai.core.integrity import MANIFEST_FILE, IntegrityError, atomic_write, atomic_write_text, sha256_file
from astrai.core.tokenizer import AutoTokenizer
from astrai.core.tokenizer_trainer import train_tokenizer

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def overwrite_middle(file: Path, size: int = 4096, byte: bytes = b"\xff") -> None:
    """Overwrite `size` bytes in the middle of a file in place, as a failing disk or a stray write would."""
    with open(file, "r+b") as f:
        f.seek(file.stat().st_size // 2)
        f.write(byte * size)


def load_error(path: Path) -> str:
    with pytest.raises(CheckpointError) as err:
        load_pretrained(path)
    return str(err.value)


@pytest.fixture(scope="module")
def tokenizer() -> AutoTokenizer:
    texts = ["hello world, a tiny corpus", "你好，世界", "the model and the tokenizer travel together"] * 20
    return train_tokenizer(iter(texts), vocab_size=300, min_frequency=1, show_progress=False)


def test_four_kib_of_0xff_in_the_weights_are_refused_naming_the_file(make_model, tmp_path):
    save_pretrained(make_model(), tmp_path)
    overwrite_middle(tmp_path / "model.safetensors")
    message = load_error(tmp_path)
    assert f"{tmp_path / 'model.safetensors'}: its sha256 differs" in message
    assert "damaged" in message and "export the model again" in message and "delete checksums.json" in message


def test_a_directory_without_a_manifest_still_loads(make_model, tmp_path):
    model = make_model()
    save_pretrained(model, tmp_path)
    (tmp_path / MANIFEST_FILE).unlink()  # as a Hugging Face download or an older export
    loaded = load_pretrained(tmp_path)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_a_nan_weight_saved_with_its_checksum_is_refused_naming_the_tensor(make_model, tmp_path):
    model = make_model()
    with torch.no_grad():
        model.get_parameter(Q_PROJ)[3, 5] = float("nan")  # a diverged run: saving does not check
    save_pretrained(model, tmp_path)
    message = load_error(tmp_path)
    assert f"model.safetensors: tensor '{Q_PROJ}' holds 1 NaN or Inf values (of 1024)" in message
    assert "checkpoint saved before training diverged" in message


def test_0xff_bytes_without_a_manifest_are_refused_as_non_finite(make_model, tmp_path):
    save_pretrained(make_model(), tmp_path)
    (tmp_path / MANIFEST_FILE).unlink()
    overwrite_middle(tmp_path / "model.safetensors")  # 0xffffffff is a float32 NaN
    message = load_error(tmp_path)
    assert "model.safetensors: tensor 'model." in message and "NaN or Inf values" in message


def test_an_inf_in_a_bf16_model_is_refused(make_model, tmp_path):
    model = make_model().to(torch.bfloat16)
    with torch.no_grad():
        model.model.norm.weight[0] = float("inf")
    save_pretrained(model, tmp_path)
    assert "tensor 'model.norm.weight' holds 1 NaN or Inf values" in load_error(tmp_path)


def test_large_finite_weights_whose_sum_overflows_still_load(make_model, tmp_path):
    model = make_model()
    with torch.no_grad():
        model.model.norm.weight.fill_(3e38)  # finite, but any two of them add up to Inf in float32
    save_pretrained(model, tmp_path)
    assert torch.equal(load_pretrained(tmp_path).model.norm.weight, model.model.norm.weight)


def test_the_manifest_lists_every_file_written_tokenizer_included(make_model, tokenizer, tmp_path):
    save_pretrained(make_model(vocab_size=320), tmp_path, tokenizer=tokenizer, max_shard_size="20KB")
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert (manifest["format_version"], manifest["algorithm"]) == (1, "sha256")
    on_disk = {p.name for p in tmp_path.iterdir()} - {MANIFEST_FILE}
    assert set(manifest["files"]) == on_disk
    assert {
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "model.safetensors.index.json",
        "generation_config.json",
        "config.json",
    } <= on_disk
    for name, entry in manifest["files"].items():
        assert entry == {"sha256": sha256_file(tmp_path / name), "size": (tmp_path / name).stat().st_size}, name


def edit_json(file: Path, key: str, value) -> None:
    data = json.loads(file.read_text())
    data[key] = value
    file.write_text(json.dumps(data))


# Each change leaves a file that parses and makes sense, so only the checksum can tell.
DAMAGE = {
    "config.json": lambda f: edit_json(f, "rms_norm_eps", 1e-3),
    "model.safetensors.index.json": lambda f: edit_json(f, "metadata", {}),
    "model-00002-of-*.safetensors": lambda f: overwrite_middle(f, size=64, byte=b"\x00"),
}


@pytest.mark.parametrize("damaged", list(DAMAGE))
def test_each_file_a_load_reads_is_checked(make_model, tmp_path, damaged):
    save_pretrained(make_model(), tmp_path, max_shard_size="8KB")
    file = next(tmp_path.glob(damaged))
    DAMAGE[damaged](file)
    assert f"{file}: " in load_error(tmp_path) and "checksums.json recorded" in load_error(tmp_path)


def test_load_config_checks_config_json(make_model, tmp_path):
    save_pretrained(make_model(), tmp_path)
    text = (tmp_path / "config.json").read_text()
    (tmp_path / "config.json").write_text(
        text.replace('"max_position_embeddings": 64', '"max_position_embeddings": 65')
    )
    with pytest.raises(CheckpointError, match=r"config\.json: .*differs"):
        load_config(tmp_path)


def test_a_damaged_tokenizer_file_is_refused(make_model, tokenizer, tmp_path):
    save_pretrained(make_model(vocab_size=320), tmp_path, tokenizer=tokenizer)
    template = tmp_path / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|im_start|>", "<|im_stort|>"))
    with pytest.raises(IntegrityError, match=r"chat_template\.jinja: .*damaged"):
        AutoTokenizer.from_pretrained(tmp_path)


def test_a_tokenizer_saved_again_into_the_model_directory_keeps_the_manifest_true(make_model, tokenizer, tmp_path):
    save_pretrained(make_model(vocab_size=320), tmp_path, tokenizer=tokenizer)
    changed = AutoTokenizer(tokenizer.backend, chat_template="{{ messages[0]['content'] }}")
    changed.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template == "{{ messages[0]['content'] }}"
    load_pretrained(tmp_path)


def test_a_tokenizer_saved_on_its_own_starts_no_manifest(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    assert not (tmp_path / MANIFEST_FILE).exists()


def test_saving_over_an_older_export_leaves_no_stale_entries(make_model, tmp_path):
    model = make_model()
    save_pretrained(model, tmp_path, max_shard_size="8KB")
    save_pretrained(model, tmp_path)
    files = json.loads((tmp_path / MANIFEST_FILE).read_text())["files"]
    assert set(files) == {"config.json", "model.safetensors"} == {p.name for p in tmp_path.iterdir()} - {MANIFEST_FILE}
    load_pretrained(tmp_path)


def test_a_damaged_manifest_is_named(make_model, tmp_path):
    save_pretrained(make_model(), tmp_path)
    overwrite_middle(tmp_path / MANIFEST_FILE, size=8, byte=b"\x00")
    message = load_error(tmp_path)
    assert f"{tmp_path / MANIFEST_FILE}: not valid JSON" in message and "delete checksums.json" in message


def test_saving_leaves_no_temporary_files(make_model, tokenizer, tmp_path):
    save_pretrained(make_model(vocab_size=320), tmp_path, tokenizer=tokenizer, max_shard_size="20KB")
    save_pretrained(make_model(vocab_size=320), tmp_path, tokenizer=tokenizer)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")] == []


def test_a_failed_atomic_write_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "config.json"
    atomic_write_text(target, "old")

    def fail(tmp: Path) -> None:
        tmp.write_text("half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
