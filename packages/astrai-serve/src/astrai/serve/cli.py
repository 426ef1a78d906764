"""`astrai-serve`: check the model directory, then start the LitServe server.

Everything that can be wrong with the settings or the model directory is found here, in the
main process, before LitServe spawns its worker: a bad path ends with one line naming the
file and a non-zero exit code instead of a worker traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from astrai.core.errors import AstraiError

from .config import ServeConfig, ServeConfigError, build_config, cuda_index
from .parent_watch import exit_with_parent

log = logging.getLogger("astrai.serve")
# Start-up failures reported as one line and exit code 1: every AstraiError (ServeConfigError,
# CheckpointError, IntegrityError, HFConfigError, ConfigError, the tokenizer's checks of its
# files) and files that cannot be read (OSError).
STARTUP_ERRORS: tuple[type[Exception], ...] = (AstraiError, OSError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="astrai-serve",
        description="Serve an AstrAI model over HTTP with OpenAI-compatible (/v1/chat/completions, "
        "/v1/completions, /v1/models) and Anthropic-compatible (/v1/messages) endpoints, plus "
        "/health, /stats and /metrics. Each worker runs one continuous-batching engine: one worker "
        "by default, --devices N for one per GPU, --workers M for M per device. With --api-key, "
        "every route but /health needs the key.",
        epilog="Settings come from the defaults, then --config, then the flags given. "
        "Example: astrai-serve --model runs/sft-lora/export --port 8000 --api-key secret; "
        "on GPUs 0 and 1: astrai-serve --model runs/sft-lora/export --devices 2",
    )
    parser.add_argument(
        "--config",
        metavar="YAML",
        help="YAML file with any of the settings below (keys as the flags, without dashes: max_batch_size: 32)",
    )
    for f in dataclasses.fields(ServeConfig):
        flag = "--" + f.name.replace("_", "-")
        default = "" if f.default is None else f" (default: {f.default})"
        if f.type in ("bool", "bool | None"):
            parser.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f.metadata["help"] + default,
            )
            continue
        kind = int if f.type in ("int", "int | None") else str
        parser.add_argument(
            flag,
            dest=f.name,
            type=kind,
            default=None,
            metavar=f.metadata.get("metavar"),
            help=f.metadata["help"] + default,
        )
    parser.add_argument("--print-config", action="store_true", help="print the resulting settings as YAML and exit")
    return parser


def preflight(config: ServeConfig):
    """Load the tokenizer and check the weights on the CPU; returns the HTTP side's ModelInfo."""
    import torch

    from astrai.core.checkpoint import load_config, load_pretrained
    from astrai.core.tokenizer import AutoTokenizer

    from .generation import ModelInfo

    model_config = load_config(config.model)
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise AstraiError(
            f"{config.model}: the tokenizer has {tokenizer.vocab_size} tokens but config.json's "
            f"vocab_size is {model_config.vocab_size}; tokenizer and model do not belong together"
        )
    if config.max_model_len is not None and config.max_model_len > model_config.max_len:
        raise ServeConfigError(
            f"max_model_len: {config.max_model_len} exceeds the model's max_len ({model_config.max_len} in config.json)"
        )
    check_gpus(config, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    config.fit_to_device(torch.cuda.is_available())
    # Reading every tensor once (names, shapes, file integrity) costs about as much as the
    # worker's own load, and turns a broken checkpoint into one clear line here.
    model = load_pretrained(config.model, dtype=None if config.dtype == "auto" else config.dtype, device="cpu")
    params = model.num_parameters()
    del model
    log.info(
        "model %s: %s, %.1fM parameters, context %d tokens, vocabulary %d",
        config.name,
        config.model,
        params / 1e6,
        config.max_model_len or model_config.max_len,
        tokenizer.vocab_size,
    )
    return ModelInfo(
        config.name,
        tokenizer,
        config.max_model_len or model_config.max_len,
        max_batch_size=config.max_batch_size,
        created=int(time.time()),
    )


def check_gpus(config: ServeConfig, visible: int) -> None:
    """Fail before start-up when the settings ask for GPUs that are not there (`visible` of them)."""
    gpus = config.gpus()
    seen = f"{visible} GPU(s) visible" + (
        f" (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']})"
        if os.environ.get("CUDA_VISIBLE_DEVICES") is not None
        else ""
    )
    if gpus is not None:
        if visible == 0:
            raise ServeConfigError(
                f"devices: asks for GPU(s) {gpus} but CUDA is not available; on the CPU "
                "use --device cpu --workers N for several engines"
            )
        if max(gpus) >= visible:
            raise ServeConfigError(
                f"devices: asks for GPU(s) {gpus} but there are {seen}; ask for at most "
                f"{visible} (--devices {visible}) or name visible ones (0..{visible - 1})"
            )
    elif config.device.startswith("cuda"):
        index = cuda_index(config.device)
        if visible == 0:
            raise ServeConfigError(f"device: {config.device!r} requested but CUDA is not available; use --device cpu")
        if index >= visible:
            raise ServeConfigError(f"device: {config.device!r} but there are {seen}; use cuda:0..cuda:{visible - 1}")
    on_gpu = gpus is not None or config.device.startswith("cuda") or (config.device == "auto" and visible > 0)
    if on_gpu and config.workers > 1 and config.kv_cache_memory is None and config.num_pages is None:
        log.warning(
            "workers: %d engines share each GPU, but no --kv-cache-memory or --num-pages is set; each "
            "engine sizes its KV cache from the free memory it finds, so the first may leave the "
            "others little",
            config.workers,
        )


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ServeConfigError(
                f"port: cannot listen on {host}:{port} ({e.strerror}); stop the other server or pick another --port"
            ) from None


_stopping = False


def _on_stop_signal(signum, frame) -> None:
    """The first SIGINT / SIGTERM starts LitServe's graceful shutdown (KeyboardInterrupt). Another
    during that shutdown (a second Ctrl-C; `uv run` passing on a SIGTERM the process also got)
    would cut it short before it stops the workers, and the at-exit join would then wait for
    them forever: so it kills the child processes first, then ends the shutdown."""
    global _stopping
    if _stopping:
        print(f"astrai-serve: {signal.Signals(signum).name} again: stopping the workers now", file=sys.stderr)
        for child in multiprocessing.active_children():
            child.kill()
    _stopping = True
    raise KeyboardInterrupt


def _stop_on_signals() -> None:
    """Make SIGINT and SIGTERM both take LitServe's graceful path (KeyboardInterrupt).

    A shell starts background jobs with SIGINT ignored, and LitServe leaves its worker
    running on SIGTERM; either would leave the port bound after `kill`.
    """
    signal.signal(signal.SIGINT, _on_stop_signal)
    signal.signal(signal.SIGTERM, _on_stop_signal)
    # Forked children (LitServe's HTTP process, its manager) re-raise the signal that stopped
    # them once they have shut down; with the default disposition that ends them quietly. They
    # also end when this process is gone (parent_watch.py).
    os.register_at_fork(after_in_child=_forked_child)


def _forked_child() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    exit_with_parent()


def _fail(error: object, code: int) -> int:
    """How astrai-serve ends on an error a person can fix: one line on stderr, no traceback."""
    print(f"astrai-serve: error: {error}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run-batch"]:
        return run_batch(argv[1:])
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "print_config")}
    try:
        config = build_config(args.config, **overrides)
        if config.api_key is None and os.environ.get("ASTRAI_API_KEY"):
            config.api_key = os.environ["ASTRAI_API_KEY"]
        if config.admin_key is None and os.environ.get("ASTRAI_ADMIN_KEY"):
            config.admin_key = os.environ["ASTRAI_ADMIN_KEY"]
    except AstraiError as e:  # ServeConfigError: a setting, named, and what to use instead
        return _fail(e, 2)
    except TypeError as e:  # a YAML value of the wrong type reaching the dataclass
        return _fail(f"config: {e}", 2)
    if args.print_config:
        import yaml

        print(
            yaml.safe_dump(
                {k: v for k, v in config.to_dict().items() if k not in ("api_key", "admin_key")}, sort_keys=False
            ),
            end="",
        )
        return 0

    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The API-server process is forked after the tokenizer was used; keep tokenizers single-threaded.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        _check_port(config.host, config.port)
        info = preflight(config)
    except STARTUP_ERRORS as e:
        return _fail(e, 1)

    from .launch import build_server, run_server

    _stop_on_signals()
    try:
        run_server(build_server(config, info), config)
    except RuntimeError as e:  # LitServe: the worker failed in setup(); its log is above
        return _fail(f"the inference worker failed to start ({e}); see its log above", 1)
    except KeyboardInterrupt:  # a second signal cut the graceful shutdown short (_on_stop_signal)
        return 130
    return 0


def batch_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    parser.prog = "astrai-serve run-batch"
    parser.description = (
        "Run a file of OpenAI Batch requests (one JSON object per line: custom_id, method POST, url "
        "/v1/chat/completions or /v1/completions, body) through the engine in this process, at full "
        "batch, and write one result line per request in the OpenAI Batch output format, in input "
        "order. A bad line becomes an error record; the rest still run. The engine settings below "
        "apply; the HTTP ones (host, port, api key, workers) do not."
    )
    parser.epilog = "Example: astrai-serve run-batch -i requests.jsonl -o results.jsonl --model runs/sft-lora/export"
    parser.add_argument("-i", "--input", required=True, metavar="JSONL", help="the requests, one per line")
    parser.add_argument("-o", "--output", required=True, metavar="JSONL", help="where the results go")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_batch(argv: Sequence[str]) -> int:
    from .batch_file import read_lines, run, write_results

    args = batch_parser().parse_args(argv)
    skip = ("config", "print_config", "input", "output", "no_progress")
    try:
        config = build_config(args.config, **{k: v for k, v in vars(args).items() if k not in skip})
        source = Path(args.input)
        if not source.is_file():
            raise ServeConfigError(f"input: {source} not found")
        logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        engine, info = batch_engine(config)
        with source.open(encoding="utf-8", errors="surrogateescape") as f:
            lines = read_lines(f, info, config.strict_fields)
    except STARTUP_ERRORS as e:
        return _fail(e, 1 if not isinstance(e, ServeConfigError) else 2)
    run(engine, info, lines, progress=not args.no_progress)
    write_results(args.output, lines)
    ok = sum(line.ok for line in lines)
    print(
        f"astrai-serve run-batch: {len(lines)} requests: {ok} results, {len(lines) - ok} error records -> {args.output}"
    )
    return 0


def batch_engine(config: ServeConfig):
    """The engine and ModelInfo of a run-batch: the model on this process's device."""
    import torch

    from astrai.core.auto import AutoModel
    from astrai.core.engine import InferenceEngine
    from astrai.core.tokenizer import AutoTokenizer

    from .generation import ModelInfo

    cuda = torch.cuda.is_available()
    check_gpus(config, torch.cuda.device_count() if cuda else 0)
    config.fit_to_device(cuda)
    device = ("cuda" if cuda else "cpu") if config.device == "auto" else config.device
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    model = AutoModel.from_pretrained(
        config.model, dtype=None if config.dtype == "auto" else config.dtype, device=device
    )
    engine = InferenceEngine(model, tokenizer, config.engine_config(), device=device)
    return engine, ModelInfo(config.name, tokenizer, engine.max_model_len, max_batch_size=config.max_batch_size)


if __name__ == "__main__":
    sys.exit(main())
