"""Settings and start-up checks: YAML vs flags, --help, and fast failures on bad model directories."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from astrai.serve import cli
from astrai.serve.config import ServeConfig, ServeConfigError, build_config, format_size, parse_size

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


@pytest.mark.parametrize(
    "yaml_text, overrides, needle",
    [
        ("model: /m\nbatch: 3\n", {}, "unknown setting(s) ['batch']"),
        ("- a\n- b\n", {}, "must hold a mapping"),
        ("model: [\n", {}, "not valid YAML"),
        ("", {}, "no model directory"),
        ("model: /m\nport: 80\n", {}, "port: must be an integer from 1024 to 65535"),
        ("model: /m\nhost: example.com\n", {}, "host:"),
        ("model: /m\ndevice: tpu\n", {}, "device:"),
        ("model: /m\ndtype: int8\n", {}, "dtype:"),
        ("model: /m\nkv_cache_memory: lots\n", {}, "kv_cache_memory:"),
        ("model: /m\nkv_cache_dtype: int8\n", {}, "kv_cache_dtype: must be one of 'auto', 'fp8', got 'int8'"),
        ("model: /m\nnum_pages: 8\nkv_cache_memory: 1GiB\n", {}, "kv_cache_memory: cannot be combined with num_pages"),
        ("model: /m\ncuda_graphs: maybe\n", {}, "cuda_graphs: must be True, False or None"),
        ("model: /m\nmax_batch_size: 64\nmax_num_batched_tokens: 32\n", {}, "max_num_batched_tokens: (32) must be >="),
        ("model: /m\nmax_batch_size: 0\n", {}, "max_batch_size:"),
        ("model: /m\nmax_request_bytes: huge\n", {}, "max_request_bytes: 'huge' is not a size"),
        ("model: /m\nmax_request_bytes: 0\n", {}, "max_request_bytes: must be positive"),
        ("model: /m\ndocs: maybe\n", {}, "docs: must be true, false or left out"),
        ("model: /m\nstrict_fields: 1\n", {}, "strict_fields: must be true or false"),
    ],
)
def test_bad_settings_name_the_setting(tmp_path, yaml_text, overrides, needle):
    path = tmp_path / "serve.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ServeConfigError) as exc:
        build_config(path, **overrides)
    assert needle in str(exc.value)


def test_engine_flags_are_engine_configs_fields_with_its_help():
    from astrai.core.engine.config import engine_fields

    serve = {f.name: f for f in dataclasses.fields(ServeConfig)}
    for f in engine_fields():
        assert f.name in serve, f"astrai-serve has no flag for EngineConfig.{f.name}"
        assert serve[f.name].metadata["help"].startswith(f.metadata["help"]), f.name
    help_text = cli.build_parser().format_help()
    assert "--cuda-graphs" in help_text and "--prefill-graphs" in help_text


def test_the_engine_config_a_server_builds_carries_every_engine_setting(tmp_path):
    cfg = build_config(None, model="/m", max_batch_size=32, kv_cache_memory="2GiB", page_size=32, cuda_graphs=False)
    engine = cfg.fit_to_device(cuda_available=False).engine_config()
    assert (engine.max_batch_size, engine.max_num_batched_tokens) == (32, 2048)
    assert (engine.kv_cache_bytes(), engine.page_size, engine.cuda_graphs) == (2 * 2**30, 32, False)


def test_parse_size():
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("512MB") == 512 * 10**6 and parse_size(1024) == 1024
    assert parse_size("1.5g") == 1_500_000_000
    for bad in ("0", "-1GB", "two", True):
        with pytest.raises(ServeConfigError):
            parse_size(bad)


def test_max_request_bytes_takes_sizes_like_kv_cache_memory(tmp_path):
    assert build_config(model="/m").request_limit() == 4 * 2**20  # the default, 4 MiB
    assert build_config(model="/m", max_request_bytes="8MiB").request_limit() == 8 * 2**20
    path = tmp_path / "serve.yaml"
    path.write_text("model: /m\nmax_request_bytes: 1000000\n")  # YAML may give plain bytes
    assert build_config(path).request_limit() == 10**6


def test_sizes_are_written_back_the_way_a_person_would():
    assert [format_size(n) for n in (4 * 2**20, 3 * 2**30, 2**10, 1500)] == ["4MiB", "3GiB", "1KiB", "1500 bytes"]
    assert parse_size(format_size(8 * 2**20)) == 8 * 2**20


def test_docs_are_off_by_default_with_a_key_and_on_without():
    assert build_config(model="/m").docs_enabled()
    assert not build_config(model="/m", api_key="k").docs_enabled()
    assert build_config(model="/m", api_key="k", docs=True).docs_enabled()
    assert not build_config(model="/m", docs=False).docs_enabled()
    cfg = build_config(model="/m")
    cfg.api_key = "from-the-environment"  # as main() sets $ASTRAI_API_KEY after the flags
    assert not cfg.docs_enabled()


def test_security_flags_reach_the_settings():
    args = cli.build_parser().parse_args(["--docs", "--no-strict-fields", "--max-request-bytes", "8MiB"])
    assert (args.docs, args.strict_fields, args.max_request_bytes) == (True, False, "8MiB")
    args = cli.build_parser().parse_args(["--no-docs"])
    assert args.docs is False and args.strict_fields is None  # not given: the YAML or the default decides
    cfg = build_config(model="/m", **{k: v for k, v in vars(args).items() if k in {"docs", "strict_fields"}})
    assert cfg.docs is False and cfg.strict_fields is True


def test_help_explains_the_security_settings(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--docs, --no-docs" in text and "off when an API key is set" in text
    assert "ignores such fields and logs each one once" in text and "(default: 4MiB)" in text
    assert "every route but /health needs the key" in text


@pytest.mark.parametrize(
    "key, docs, served", [(None, None, True), ("k", None, False), ("k", True, True), (None, False, False)]
)
def test_docs_routes_exist_only_when_docs_are_on(key, docs, served):
    from astrai.serve.generation import ModelInfo
    from astrai.serve.launch import build_server

    server = build_server(build_config(model="/m", device="cpu", api_key=key, docs=docs), ModelInfo("m", None, 64))
    paths = {route.path for route in server.app.routes}
    assert ({"/docs", "/redoc", "/openapi.json"} <= paths) == served
    assert not {"/docs", "/redoc", "/openapi.json"} & paths or served


def test_print_config_merges_and_hides_the_key(tmp_path, capsys):
    assert cli.main(["--model", str(tmp_path), "--api-key", "secret", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert f"model: {tmp_path}" in out and "secret" not in out


def _broken(model_dir, tmp_path, name):
    path = tmp_path / name
    shutil.copytree(model_dir, path)
    return path


@pytest.mark.parametrize(
    "breakage, needle",
    [
        ("missing_dir", "model directory not found"),
        ("no_config", "config.json: not found"),
        ("bad_config", "config.json: not valid JSON"),
        ("no_weights", "no model.safetensors"),
        ("truncated_weights", "not a readable safetensors file"),
        ("no_tokenizer", "has no tokenizer.json"),
        ("wrong_vocab", "vocab_size"),
        ("damaged_weights", "the file is damaged"),
    ],
)
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
    proc = subprocess.run(
        serve_command("--model", str(tmp_path / "nope")), capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert proc.returncode == 1
    assert "model directory not found" in proc.stderr and "Traceback" not in proc.stderr
    assert "Uvicorn running" not in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "device,devices,cuda,expected",
    [
        ("auto", None, True, (256, 8192)),
        ("auto", None, False, (64, 2048)),
        ("cpu", None, True, (64, 2048)),
        ("cuda:1", None, True, (256, 8192)),
        ("auto", 2, True, (256, 8192)),
    ],
)
def test_engine_sizes_left_unset_fit_the_device_the_engines_run_on(device, devices, cuda, expected):
    config = ServeConfig(model="/m", device=device, devices=devices).fit_to_device(cuda)
    assert (config.max_batch_size, config.max_num_batched_tokens) == expected
    mine = ServeConfig(model="/m", max_batch_size=8, max_num_batched_tokens=512).fit_to_device(cuda)
    assert (mine.max_batch_size, mine.max_num_batched_tokens) == (8, 512)  # given values are kept


def test_http_processes_default_to_one_per_four_cores_on_a_gpu_and_one_on_the_cpu(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert ServeConfig(model="/m", device="cuda").fit_to_device(True).api_servers == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)))
    assert ServeConfig(model="/m", device="cuda").fit_to_device(True).api_servers == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert ServeConfig(model="/m", device="cuda").fit_to_device(True).api_servers == 4
    assert ServeConfig(model="/m", device="cpu").fit_to_device(True).api_servers == 1
    assert ServeConfig(model="/m", device="cuda", api_servers=7).fit_to_device(True).api_servers == 7
    with pytest.raises(ServeConfigError, match="api_servers"):
        ServeConfig(model="/m", api_servers=0).validate()
