"""Settings and start-up checks: YAML vs flags, --help, and fast failures on bad model directories."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest

from astrai.serve import cli
from astrai.serve.config import ServeConfig, ServeConfigError, build_config, parse_size

REPO = Path(__file__).resolve().parents[2]


def test_help_documents_every_setting(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(ServeConfig):
        assert "--" + f.name.replace("_", "-") in text
    for flag in ("--config", "--print-config", "/v1/messages", "/v1/chat/completions"):
        assert flag in text


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("model: /m\nport: 9001\nmax-batch-size: 8\nkv_cache_memory: 1GiB\n")
    cfg = build_config(path, port=9002)
    assert (cfg.model, cfg.port, cfg.max_batch_size, cfg.kv_cache_memory) == ("/m", 9002, 8, "1GiB")
    assert cfg.host == "127.0.0.1" and cfg.name == "m"


def test_repo_serve_yaml_is_valid():
    cfg = build_config(REPO / "configs" / "serve.yaml", model="/some/model")
    assert cfg.model == "/some/model"


@pytest.mark.parametrize("yaml_text, overrides, needle", [
    ("model: /m\nbatch: 3\n", {}, "unknown setting(s) ['batch']"),
    ("- a\n- b\n", {}, "must hold a mapping"),
    ("model: [\n", {}, "not valid YAML"),
    ("", {}, "no model directory"),
    ("model: /m\nport: 80\n", {}, "port: must be an integer from 1024 to 65535"),
    ("model: /m\nhost: example.com\n", {}, "host:"),
    ("model: /m\ndevice: tpu\n", {}, "device:"),
    ("model: /m\ndtype: int8\n", {}, "dtype:"),
    ("model: /m\nkv_cache_memory: lots\n", {}, "kv_cache_memory:"),
    ("model: /m\nkv_cache_dtype: int8\n", {}, "kv_cache_dtype: 'int8' is not supported; use one of auto, fp8"),
    ("model: /m\nmax_batch_size: 0\n", {}, "max_batch_size:"),
])
def test_bad_settings_name_the_setting(tmp_path, yaml_text, overrides, needle):
    path = tmp_path / "serve.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ServeConfigError) as exc:
        build_config(path, **overrides)
    assert needle in str(exc.value)


def test_parse_size():
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("512MB") == 512 * 10**6 and parse_size(1024) == 1024
    assert parse_size("1.5g") == 1_500_000_000
    for bad in ("0", "-1GB", "two", True):
        with pytest.raises(ServeConfigError):
            parse_size(bad)


def test_print_config_merges_and_hides_the_key(tmp_path, capsys):
    assert cli.main(["--model", str(tmp_path), "--api-key", "secret", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert f"model: {tmp_path}" in out and "secret" not in out


def _broken(model_dir, tmp_path, name):
    path = tmp_path / name
    shutil.copytree(model_dir, path)
    return path


@pytest.mark.parametrize("breakage, needle", [
    ("missing_dir", "model directory not found"),
    ("no_config", "config.json: not found"),
    ("bad_config", "config.json: not valid JSON"),
    ("no_weights", "no model.safetensors"),
    ("truncated_weights", "not a readable safetensors file"),
    ("no_tokenizer", "has no tokenizer.json"),
    ("wrong_vocab", "vocab_size"),
    ("damaged_weights", "the file is damaged"),
])
def test_broken_model_directory_fails_before_any_worker(model_dir, tmp_path, capsys, breakage, needle):
    path = _broken(model_dir, tmp_path, breakage)
    if breakage == "missing_dir":
        shutil.rmtree(path)
    elif breakage == "no_config":
        (path / "config.json").unlink()
    elif breakage == "bad_config":
        (path / "config.json").write_text("{")
    elif breakage == "no_weights":
        (path / "model.safetensors").unlink()
    elif breakage == "truncated_weights":
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif breakage == "no_tokenizer":
        (path / "tokenizer.json").unlink()
    elif breakage == "wrong_vocab":  # a hand edit, so without the checksums that would call it damage
        (path / "checksums.json").unlink()
        text = (path / "config.json").read_text()
        (path / "config.json").write_text(text.replace('"vocab_size": 320', '"vocab_size": 300'))
    elif breakage == "damaged_weights":  # bytes changed in place: same size, same header, other weights
        with open(path / "model.safetensors", "r+b") as f:
            f.seek(-4096, 2)
            f.write(b"\xff" * 4096)
    code = cli.main(["--model", str(path), "--device", "cpu", "--port", "18999"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("astrai-serve: error:") and needle in err
    assert "Traceback" not in err


def test_command_exits_nonzero_with_one_line_and_no_traceback(tmp_path, serve_command):
    proc = subprocess.run(serve_command("--model", str(tmp_path / "nope")), capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 1
    assert "model directory not found" in proc.stderr and "Traceback" not in proc.stderr
    assert "Uvicorn running" not in proc.stdout + proc.stderr
