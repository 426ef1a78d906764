"""Server settings: one dataclass, filled from defaults < YAML file < command-line flags.

Every field is also a flag of `astrai-serve` (underscores become dashes); `help` in the field
metadata is the flag's help text, so the YAML keys and the flags cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from astrai.core.engine.config import EngineConfig, engine_fields
from astrai.core.errors import AstraiError
from astrai.core.sizes import parse_bytes

HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # what LitServe's run() accepts
DTYPES = ("auto", "float32", "bfloat16", "float16")
KV_CACHE_DTYPES = ("auto", "fp8")  # InferenceEngine's kv_cache_dtype
LOG_LEVELS = ("debug", "info", "warning", "error")


# Engine sizes left unset take these, by where the engines run: a GPU decodes a batch of 256
# about as fast as one of 64, a CPU does not.
GPU_DEFAULTS = {"max_batch_size": 256, "max_num_batched_tokens": 8192}
CPU_DEFAULTS = {"max_batch_size": 64, "max_num_batched_tokens": 2048}
# A GPU engine streams tens of thousands of tokens a second, more than one Python HTTP process
# can write; CPU engines are slow enough for one, and need the cores themselves.
MAX_DEFAULT_API_SERVERS = 4


class ServeConfigError(AstraiError):
    """A setting is wrong; the message names it and says what to use instead."""


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


_ENGINE_FIELDS = {f.name: f for f in engine_fields()}
_SAME = object()


def _engine_opt(name: str, default: Any = _SAME, default_note: str | None = None) -> Any:
    """A ServeConfig field for EngineConfig's field `name`: its help (plus `default_note`), and
    its default unless the server picks one by device (`default`)."""
    source = _ENGINE_FIELDS[name]
    help = source.metadata["help"] + (f" ({default_note})" if default_note else "")
    extra = {k: v for k, v in source.metadata.items() if k != "help"}
    return _opt(source.default if default is _SAME else default, help, **extra)


@dataclass
class ServeConfig:
    model: str | None = _opt(None, "model directory (config.json, model.safetensors, tokenizer files)", metavar="DIR")
    host: str = _opt("127.0.0.1", f"address to listen on: one of {', '.join(HOSTS)}")
    port: int = _opt(8000, "port to listen on (1024-65535)")
    device: str = _opt(
        "auto",
        "the one device to serve on: auto (cuda when available), cpu, cuda (GPU 0) or "
        "cuda:N; for several GPUs use --devices",
    )
    devices: int | str | list[int] | None = _opt(
        None,
        "GPUs to serve on, one engine each (times --workers): a count N (GPUs 0..N-1) or GPU indexes "
        "such as 0,2; with device auto or cuda",
        metavar="N|I,J",
    )
    workers: int = _opt(
        1,
        "engines per device, each in its own worker process; a request goes to the least "
        "busy one (engines on one GPU share its memory: set --kv-cache-memory)",
    )
    api_servers: int | None = _opt(
        None,
        "HTTP server processes, all on the one port (as vLLM's --api-server-count): "
        "each parses requests and writes streams for its share of the clients "
        "(default: on a GPU one per 4 CPU cores, at most "
        f"{MAX_DEFAULT_API_SERVERS}; 1 on the CPU)",
    )
    dtype: str = _opt("auto", f"weights dtype: {', '.join(DTYPES)} (auto: as stored)")
    # The engine's settings: EngineConfig's fields, with its help text (astrai.core.engine.config).
    max_batch_size: int | None = _engine_opt(
        "max_batch_size",
        None,
        f"default: {GPU_DEFAULTS['max_batch_size']} on a GPU, {CPU_DEFAULTS['max_batch_size']} on the CPU",
    )
    max_num_batched_tokens: int | None = _engine_opt(
        "max_num_batched_tokens",
        None,
        f"default: {GPU_DEFAULTS['max_num_batched_tokens']} on a GPU, "
        f"{CPU_DEFAULTS['max_num_batched_tokens']} on the CPU",
    )
    kv_cache_memory: str | None = _engine_opt("kv_cache_memory")
    num_pages: int | None = _engine_opt("num_pages")
    kv_cache_dtype: str = _engine_opt("kv_cache_dtype")
    page_size: int = _engine_opt("page_size")
    max_model_len: int | None = _engine_opt("max_model_len")
    cuda_graphs: bool | None = _engine_opt("cuda_graphs")
    prefill_graphs: bool | None = _engine_opt("prefill_graphs")
    num_scheduler_steps: int | None = _engine_opt("num_scheduler_steps")
    served_model_name: str | None = _opt(
        None, "model name clients send and /v1/models lists (default: the directory name)", metavar="NAME"
    )
    api_key: str | None = _opt(
        None,
        "require this key: 'Authorization: Bearer KEY' (OpenAI) or "
        "'x-api-key: KEY' (Anthropic); default: $ASTRAI_API_KEY, else no auth",
        metavar="KEY",
    )
    admin_key: str | None = _opt(
        None,
        "key of the weight-update endpoints (/admin/pause, /admin/update_weights, /admin/resume); "
        "default: $ASTRAI_ADMIN_KEY, else the API key; with neither they are off",
        metavar="KEY",
    )
    docs: bool | None = _opt(
        None,
        "serve the Swagger UI (/docs, /redoc) and the OpenAPI schema (/openapi.json); "
        "default: off when an API key is set (then they need the key too), on "
        "otherwise",
    )
    max_request_bytes: str = _opt(
        "4MiB",
        "largest request body accepted, e.g. 8MiB or 500KB; a larger one is refused with 413 before it is read",
        metavar="SIZE",
    )
    chat_page: bool = _opt(
        True,
        "serve a small chat page at / (static, no data of its own; it asks for the API key "
        "when the server has one); --no-chat-page leaves / unanswered",
    )
    strict_fields: bool = _opt(
        True,
        "refuse requests with a field this server does not know (400 naming it, "
        "as OpenAI and Anthropic do); --no-strict-fields ignores such fields and "
        "logs each one once",
    )
    fast_queue: bool = _opt(
        True,
        "the workers' replies reach the HTTP process over batched ZeroMQ "
        "(--no-fast-queue: LitServe's multiprocessing queue, slower)",
    )
    worker_restart: bool = _opt(
        True,
        "start a new engine worker when one dies (its requests end with a 503 "
        "error at once, and it waits 0.5 s, 1 s, 2 s ... when it keeps dying); "
        "--no-worker-restart: the server exits instead",
    )
    log_level: str = _opt("info", f"one of {', '.join(LOG_LEVELS)}")

    def fit_to_device(self, cuda_available: bool) -> ServeConfig:
        """Fill the engine sizes left unset with GPU_DEFAULTS or CPU_DEFAULTS, by where the
        engines will run (device auto: a GPU when CUDA is available)."""
        on_gpu = self.device.startswith("cuda") or self.gpus() is not None or (self.device == "auto" and cuda_available)
        for name, value in (GPU_DEFAULTS if on_gpu else CPU_DEFAULTS).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.api_servers is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            self.api_servers = max(1, min(MAX_DEFAULT_API_SERVERS, cores // 4)) if on_gpu else 1
        return self

    def validate(self) -> ServeConfig:
        if not self.model:
            raise ServeConfigError("model: no model directory given; pass --model DIR or set 'model:' in the YAML")
        if self.host not in HOSTS:
            raise ServeConfigError(f"host: {self.host!r} is not supported; use one of {', '.join(HOSTS)}")
        _check_int(self, "port", 1024, 65535)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)):
            raise ServeConfigError(f"device: {self.device!r} is not a device; use auto, cpu, cuda or cuda:N")
        gpus = self.gpus()
        if gpus is not None and self.device == "cpu":
            raise ServeConfigError(
                f"devices: asks for GPUs ({self.devices!r}) but device is 'cpu'; drop one of "
                "them (on the CPU, --workers N runs N engines)"
            )
        if gpus is not None and self.device.startswith("cuda:"):
            raise ServeConfigError(
                f"devices: cannot be combined with device {self.device!r}; name the GPUs in "
                "devices (e.g. --devices 1,2) and leave device at auto or cuda"
            )
        if self.dtype not in DTYPES:
            raise ServeConfigError(f"dtype: {self.dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        _check_int(self, "workers", 1)
        if self.api_servers is not None:
            _check_int(self, "api_servers", 1)
        if self.kv_cache_memory is not None:
            parse_size(self.kv_cache_memory, "kv_cache_memory")
        try:
            self._provisional_engine_config().validate()
        except AstraiError as e:
            raise ServeConfigError(_as_setting(str(e))) from None
        parse_size(self.max_request_bytes, "max_request_bytes")
        for name in ("fast_queue", "strict_fields", "worker_restart", "chat_page"):
            if not isinstance(getattr(self, name), bool):
                raise ServeConfigError(f"{name}: must be true or false, got {getattr(self, name)!r}")
        if self.docs is not None and not isinstance(self.docs, bool):
            raise ServeConfigError(f"docs: must be true, false or left out (auto), got {self.docs!r}")
        if self.log_level not in LOG_LEVELS:
            raise ServeConfigError(f"log_level: {self.log_level!r}; use one of {', '.join(LOG_LEVELS)}")
        return self

    def engine_config(self) -> EngineConfig:
        """The engine's settings (after fit_to_device has picked the sizes left unset)."""
        return EngineConfig(**{f.name: getattr(self, f.name) for f in engine_fields()})

    def _provisional_engine_config(self) -> EngineConfig:
        """engine_config() before fit_to_device: unset sizes take values that cannot clash with the
        ones given (the device's defaults will not either: a GPU's budget exceeds its batch)."""
        config = self.engine_config()
        batch, budget = config.max_batch_size, config.max_num_batched_tokens
        if batch is None:
            batch = budget if _positive_int(budget) else CPU_DEFAULTS["max_batch_size"]
        if budget is None:
            budget = max(CPU_DEFAULTS["max_num_batched_tokens"], batch) if _positive_int(batch) else batch
        return config.replace(max_batch_size=batch, max_num_batched_tokens=budget)

    def gpus(self) -> list[int] | None:
        """The GPU indexes `devices` asks for (None: not set, serve on `device`)."""
        return parse_devices(self.devices)

    def docs_enabled(self) -> bool:
        """`docs` as set, else auto: API documentation maps the server for anyone who can reach it,
        so a server that asks for a key does not offer it unless told to."""
        return (not self.api_key) if self.docs is None else self.docs

    def request_limit(self) -> int:
        """`max_request_bytes` in bytes."""
        return parse_size(self.max_request_bytes, "max_request_bytes")

    @property
    def name(self) -> str:
        return self.served_model_name or Path(str(self.model)).resolve().name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _as_setting(message: str) -> str:
    """An EngineConfig message ("page_size must be ...") worded as every ServeConfig message
    is ("page_size: must be ...")."""
    name, _, rest = message.partition(" ")
    return f"{name}: {rest}" if name.isidentifier() else message


def _check_int(cfg: ServeConfig, name: str, lo: int, hi: int | None = None) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
        allowed = f"from {lo} to {hi}" if hi is not None else f"of at least {lo}"
        raise ServeConfigError(f"{name}: must be an integer {allowed}, got {value!r}")


def cuda_index(device: str) -> int:
    """The GPU index of a CUDA device string: "cuda" -> 0, "cuda:2" -> 2."""
    return int(device.partition(":")[2] or 0)


def parse_devices(value: Any) -> list[int] | None:
    """GPU indexes from a count (2 -> [0, 1]), a list ([0, 2]) or a string ("2", "0,2", "1,")."""
    if value is None:
        return None
    hint = "use a GPU count (devices: 2 means GPUs 0 and 1) or GPU indexes (devices: [0, 2] or --devices 0,2)"
    if isinstance(value, str):
        text = value.strip().strip("[]")
        parts = [p.strip() for p in text.split(",")]
        if "," not in text and parts[0].isdigit():
            value = int(parts[0])
        elif all(p.isdigit() for p in parts if p) and any(parts):
            value = [int(p) for p in parts if p]
        else:
            raise ServeConfigError(f"devices: {value!r} is not a GPU count or a list of GPU indexes; {hint}")
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ServeConfigError(f"devices: must ask for at least 1 GPU, got {value}; {hint}")
        return list(range(value))
    if isinstance(value, (list, tuple)) and value:
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
            raise ServeConfigError(f"devices: GPU indexes must be integers from 0, got {list(value)!r}; {hint}")
        if len(set(value)) != len(value):
            raise ServeConfigError(
                f"devices: {list(value)!r} names a GPU twice; for several engines on one GPU use --workers"
            )
        return list(value)
    raise ServeConfigError(f"devices: {value!r} is not a GPU count or a list of GPU indexes; {hint}")


def parse_size(size: int | str, name: str = "size") -> int:
    """Bytes from an int or a string like '2GiB', '512MB', '1.5G': astrai.core's one parser, so the
    engine and GRPO accept every size astrai-serve does. Raises ServeConfigError "<name>: ...", the
    way every astrai-serve setting is named in its messages."""
    return parse_bytes(size, f"{name}:", ServeConfigError)


def format_size(n: int) -> str:
    """A byte count the way a person would write it: 4194304 -> '4MiB', 1500 -> '1500 bytes'."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n} bytes"


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(ServeConfig)]


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Settings from a YAML mapping; keys may use dashes or underscores."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ServeConfigError(f"config: {path} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ServeConfigError(f"config: {path} is not valid YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ServeConfigError(f"config: {path} must hold a mapping of settings, got {type(data).__name__}")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(field_names()))
    if unknown:
        raise ServeConfigError(f"config: {path}: unknown setting(s) {unknown}; known: {field_names()}")
    return data


def build_config(yaml_path: str | Path | None = None, **overrides: Any) -> ServeConfig:
    """Defaults, then the YAML file, then `overrides` (flags that were given; None = not given)."""
    values = load_yaml(yaml_path) if yaml_path else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    for name in ("kv_cache_memory", "max_request_bytes"):  # sizes: YAML may give a plain byte count
        if isinstance(values.get(name), int) and not isinstance(values.get(name), bool):
            values[name] = str(values[name])
    return ServeConfig(**values).validate()
