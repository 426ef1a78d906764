"""The LitServe internals serve/litserve_bridge.py relies on are still there, in the shape it
expects. When LitServe is upgraded and one of these fails, read the new LitServe code for that
name and adapt the bridge (and LITSERVE_VERSION), not this test."""

from __future__ import annotations

import inspect
import tomllib
from pathlib import Path

import litserve
import litserve.server
from litserve.loops import StreamingLoop
from litserve.loops.base import _SENTINEL_VALUE, LitLoop
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, LoopResponseType, ResponseBufferItem, WorkerSetupStatus

from astrai.serve import litserve_bridge
from astrai.serve.litserve_bridge import LITSERVE_VERSION, ReplyTransportServer, reply

REPO = Path(__file__).resolve().parents[2]


def _parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_the_installed_litserve_is_the_version_the_bridge_was_written_for_and_pinned_exactly():
    assert litserve.__version__ == LITSERVE_VERSION
    dependencies = tomllib.loads((REPO / "packages/astrai-serve/pyproject.toml").read_text())["project"]["dependencies"]
    assert f"litserve=={LITSERVE_VERSION}" in dependencies


def test_the_server_still_creates_its_transport_and_request_queues_in_init_manager_before_starting_workers():
    assert _parameters(litserve.LitServer._init_manager) == ["self", "num_api_servers"]
    run = inspect.getsource(litserve.LitServer.run)
    assert run.index("self._init_manager(") < run.index("self.launch_inference_worker(")
    init = inspect.getsource(litserve.LitServer._init_manager)
    assert "self._transport" in init and "self.litapi_request_queues[lit_api.api_path] =" in init
    assert _parameters(litserve.LitServer._inference_workers_config_for_api) == ["self", "api_path"]
    assert issubclass(ReplyTransportServer, litserve.LitServer)


def test_workers_started_and_restarted_get_the_request_queue_the_server_holds():
    for launch in (litserve.LitServer.launch_inference_worker, litserve.LitServer.launch_single_inference_worker):
        assert "self._get_request_queue(lit_api.api_path)" in inspect.getsource(launch), launch.__name__
    assert "self.litapi_request_queues[api_path]" in inspect.getsource(litserve.LitServer._get_request_queue)


def test_the_http_side_still_reads_replies_as_uid_then_response_type_and_worker_last():
    source = inspect.getsource(litserve.server.response_queue_to_buffer)
    assert "uid, (*response, response_type, worker_id) = result" in source
    assert "response_item.worker_id = int(worker_id)" in source
    uid, (data, status, response_type, worker) = reply("u", {"events": []}, 3)
    assert (uid, status, response_type, worker) == ("u", LitAPIStatus.OK, LoopResponseType.STREAMING, 3)


def test_the_streaming_loop_methods_the_burst_loop_calls_keep_their_signatures():
    assert _parameters(StreamingLoop._process_streaming_request) == [
        "self",
        "request",
        "lit_api",
        "transport",
        "callback_runner",
        "lit_spec",
    ]
    assert _parameters(LitLoop.put_response) == [
        "self",
        "transport",
        "response_queue_id",
        "uid",
        "response_data",
        "status",
        "response_type",
    ]
    assert _parameters(StreamingLoop.run_streaming_loop_async) == [
        "self",
        "lit_api",
        "request_queue",
        "transport",
        "callback_runner",
    ]
    assert _parameters(StreamingLoop.__call__)[:6] == [
        "self",
        "lit_api",
        "device",
        "worker_id",
        "request_queue",
        "transport",
    ]
    assert _SENTINEL_VALUE == (None, None, None, None)
    assert callable(StreamingLoop.kill)


def test_reply_buffers_statuses_and_worker_records_keep_their_names():
    item = ResponseBufferItem(event=None, response_queue=[])
    assert item.response_queue == [] and item.event is None
    for name in ("START", "OK", "ERROR", "FINISH_STREAMING"):
        assert hasattr(LitAPIStatus, name), name
    for name in ("READY", "ERROR"):
        assert hasattr(WorkerSetupStatus, name), name
    run = inspect.getsource(litserve.LitServer.run)
    assert "self.inference_workers" in run
    assert "workers_setup_status" in inspect.getsource(litserve.LitServer)
    spec = LitSpec()
    for name in ("response_buffer", "request_queue", "response_queue_id"):
        assert hasattr(spec, name), name  # set by LitServe: the buffers, the queue, this process's index
    setup = inspect.getsource(LitSpec.setup)
    assert "self.response_buffer = server.response_buffer" in setup and "self.request_queue =" in setup
    assert "spec.response_queue_id = response_queue_id" in inspect.getsource(litserve.LitServer._start_server)


def test_litserve_still_registers_its_own_index_at_the_root_which_the_chat_page_replaces():
    source = inspect.getsource(litserve.LitServer._register_internal_endpoints)
    assert '@self.app.get("/"' in source


def test_every_private_litserve_name_in_serve_goes_through_the_bridge():
    serve = REPO / "packages/astrai-serve/src/astrai/serve"
    for path in serve.glob("*.py"):
        if path.name == litserve_bridge.__name__.rsplit(".", 1)[1] + ".py":
            continue
        text = path.read_text()
        assert "import litserve" not in text and "from litserve" not in text, path.name
