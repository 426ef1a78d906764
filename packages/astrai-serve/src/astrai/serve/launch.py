"""Putting the server together and running it: where the workers go (`placement`), the
LitServer around our ProtocolSpec and EngineAPI (`build_server`), and `run_server` with its
start-up watchdog. Kept apart from server.py, which holds what runs per request.
"""

from __future__ import annotations

import logging
import threading

from .admin import ADMIN_PREFIX
from .config import ServeConfig, cuda_index
from .control_plane import ControlPlane
from .generation import ModelInfo
from .guard import CHAT_PAGE, OPEN_PATHS, RequestGuard
from .litserve_bridge import FAILED, READY, LitServer, ReplyTransportServer, serve_at_root, startup_state
from .openapi_doc import install_openapi_doc
from .request_queue import RoutedRequestQueue
from .server import _MODELS, ProtocolSpec
from .transport import BatchedZMQTransport

log = logging.getLogger("astrai.serve")


def placement(config: ServeConfig, cuda_available: bool) -> tuple[str, list[int], int]:
    """(accelerator, device indexes, workers per device) for LitServer.

    LitServe starts len(devices) x workers_per_device workers and hands each its device
    ("cuda:1"; "cpu" on the CPU, where the index list is just [0]).
    """
    gpus = config.gpus()
    if gpus is not None:
        return "cuda", gpus, config.workers
    device = config.device
    if device == "auto":
        device = "cuda" if cuda_available else "cpu"
    if device == "cpu":
        return "cpu", [0], config.workers
    return "cuda", [cuda_index(device)], config.workers


def build_server(config: ServeConfig, info: ModelInfo) -> LitServer:
    """A LitServer with one engine per worker and ``config.workers`` workers per device, all
    each request sent to the least busy serving one."""
    import torch

    from .api import EngineAPI

    accelerator, devices, per_device = placement(config, torch.cuda.is_available())
    control = ControlPlane(len(devices) * per_device, config.api_servers or 1)
    spec = ProtocolSpec(config, info, control)
    api = EngineAPI(config, spec, control)
    log.info(
        "%d engine(s): %d on each of %s",
        control.num_workers,
        per_device,
        "the CPU" if accelerator == "cpu" else ", ".join(f"cuda:{i}" for i in devices),
    )
    # timeout=False: requests leave LitServe's queue at once (the engine schedules them), so a
    # queue timeout would only cut off long generations.
    # fast_queue is ours (BatchedZMQTransport), not LitServe's: see transport.py.
    # RequestGuard checks the key and the body size on every route (guard.py says why not
    # LitServe's own auth and size hooks); without docs FastAPI adds no /docs, /redoc, /openapi.json.
    guard = (
        RequestGuard,
        {
            "api_key": config.api_key,
            "admin_key": config.admin_key or config.api_key,
            "admin_prefix": ADMIN_PREFIX,
            "max_request_bytes": config.request_limit(),
            "rejected": spec.rejected,
            "open_paths": OPEN_PATHS | {CHAT_PAGE} if config.chat_page else OPEN_PATHS,
        },
    )
    server = ReplyTransportServer(
        api,
        accelerator=accelerator,
        devices=1 if accelerator == "cpu" else devices,
        workers_per_device=per_device,
        timeout=False,
        fast_queue=False,
        restart_workers=config.worker_restart,
        model_metadata={"model": info.name, "max_model_len": info.max_model_len},
        middlewares=[guard],
        disable_openapi_url=not config.docs_enabled(),
    )
    if config.chat_page:
        serve_at_root(server, spec.chat_page)
    install_openapi_doc(server.app, _MODELS, {"/v1/messages"})  # bodies and errors in /openapi.json (behind the key)
    server.control_plane = control  # run_server closes it (its socket files)
    server.make_request_queue = RoutedRequestQueue
    if config.fast_queue:
        server.make_transport = BatchedZMQTransport
    return server


def run_server(server: LitServer, config: ServeConfig) -> None:
    """`server.run()` with a start-up watchdog.

    LitServe waits for its worker's status without checking that the process is alive, so a
    worker that dies before reporting (an import error, the OOM killer) would hang start-up.
    The watchdog marks such a worker failed, and `run()` raises RuntimeError.
    """
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.2):
            status, workers = startup_state(server)
            if status is None or not workers:
                continue
            try:
                states = dict(status)
                if any(v == READY for v in states.values()):
                    return
                if any(not w.is_alive() for w in workers):
                    for key in states:
                        status[key] = FAILED
                    return
            except (OSError, EOFError, BrokenPipeError):  # the manager is gone: shutting down
                return

    threading.Thread(target=watch, name="astrai-startup-watch", daemon=True).start()
    from astrai.core.engine.host_settings import quiet_gc

    quiet_gc()  # the HTTP process is forked from this one: it starts with the same frozen objects
    try:
        server.run(
            host=config.host,
            port=config.port,
            log_level=config.log_level,
            generate_client_file=False,
            num_api_servers=config.api_servers or 1,
        )
    finally:
        done.set()
        for queue in server.request_queues():  # their socket files
            queue.close()
        if getattr(server, "control_plane", None) is not None:
            server.control_plane.close()
