"""`devices` (one engine per GPU), its checks against `device` and `workers`, where LitServe puts
the workers, and the control plane that reaches every worker (aborts, /stats). CPU only: the
start-up on two GPUs is in test_serve_multi_gpu.py."""

from __future__ import annotations

import os
import threading
import time

import pytest

from astrai.serve import cli
from astrai.serve.api import pin_gpu
from astrai.serve.config import ServeConfigError, build_config, parse_devices
from astrai.serve.control_plane import ControlPlane, combine_stats
from astrai.serve.launch import placement


# -- parsing and checks -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value, gpus",
    [
        (None, None),
        (2, [0, 1]),
        ("2", [0, 1]),
        ("0,2", [0, 2]),
        ("1,", [1]),
        ("[3, 1]", [3, 1]),
        ([1], [1]),
        ((0, 1), [0, 1]),
    ],
)
def test_devices_are_a_count_or_gpu_indexes(value, gpus):
    assert parse_devices(value) == gpus


@pytest.mark.parametrize(
    "value, message",
    [
        (0, "at least 1 GPU"),
        ("0", "at least 1 GPU"),
        (-1, "at least 1 GPU"),
        ("two", "not a GPU count"),
        ("0,x", "not a GPU count"),
        ([], "not a GPU count"),
        ([0, -1], "integers from 0"),
        ([0, 0], "names a GPU twice"),
        (True, "not a GPU count"),
        (1.5, "not a GPU count"),
        ("", "not a GPU count"),
    ],
)
def test_bad_devices_name_the_setting_and_the_forms(value, message):
    with pytest.raises(ServeConfigError, match=f"^devices: .*{message}"):
        parse_devices(value)


def test_devices_cannot_go_with_a_cpu_or_a_single_gpu_device():
    with pytest.raises(ServeConfigError, match="devices: asks for GPUs .* device is 'cpu'.*--workers"):
        build_config(model="m", devices=2, device="cpu")
    with pytest.raises(ServeConfigError, match="devices: cannot be combined with device 'cuda:1'"):
        build_config(model="m", devices="0,1", device="cuda:1")
    assert build_config(model="m", devices="0,1", device="cuda").gpus() == [0, 1]
    assert build_config(model="m", devices=2, workers=2).gpus() == [0, 1]


def test_devices_from_yaml_and_flags(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("model: m\ndevices: [0, 1]\nworkers: 2\n")
    assert build_config(path).gpus() == [0, 1]
    assert build_config(path, devices="1").gpus() == [0]  # the flag wins
    path.write_text("model: m\ndevices: many\n")
    with pytest.raises(ServeConfigError, match="^devices: 'many'"):
        build_config(path)


def test_gpus_are_checked_against_the_visible_ones(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    cli.check_gpus(build_config(model="m", devices=2), visible=2)
    cli.check_gpus(build_config(model="m", device="cuda:1"), visible=2)
    with pytest.raises(
        ServeConfigError,
        match=r"devices: asks for GPU\(s\) \[0, 1, 2\] but there are 2 GPU\(s\) "
        r"visible \(CUDA_VISIBLE_DEVICES=4,5\); ask for at most 2",
    ):
        cli.check_gpus(build_config(model="m", devices=3), visible=2)
    with pytest.raises(ServeConfigError, match=r"devices: asks for GPU\(s\) \[2\]"):
        cli.check_gpus(build_config(model="m", devices="2,"), visible=2)
    with pytest.raises(
        ServeConfigError, match="devices: .* CUDA is not available; on the CPU use --device cpu --workers"
    ):
        cli.check_gpus(build_config(model="m", devices=1), visible=0)
    with pytest.raises(ServeConfigError, match="device: 'cuda:2' but there are 2 GPU"):
        cli.check_gpus(build_config(model="m", device="cuda:2"), visible=2)
    with pytest.raises(ServeConfigError, match="device: 'cuda' requested but CUDA is not available"):
        cli.check_gpus(build_config(model="m", device="cuda"), visible=0)
    cli.check_gpus(build_config(model="m", device="auto", workers=2), visible=0)  # auto on a CPU box: fine


def test_several_engines_on_one_gpu_without_a_kv_budget_warn(caplog):
    with caplog.at_level("WARNING", logger="astrai.serve"):
        cli.check_gpus(build_config(model="m", devices=2, workers=2), visible=2)
    assert "workers: 2 engines share each GPU" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="astrai.serve"):
        cli.check_gpus(build_config(model="m", devices=2, workers=2, kv_cache_memory="4GiB"), visible=2)
        cli.check_gpus(build_config(model="m", devices=2), visible=2)
    assert caplog.text == ""


def test_the_command_line_fails_before_start(model_dir, capsys, free_port):
    assert cli.main(["--model", str(model_dir), "--devices", "2", "--device", "cpu"]) == 2
    assert "astrai-serve: error: devices: asks for GPUs ('2') but device is 'cpu'" in capsys.readouterr().err
    assert cli.main(["--model", str(model_dir), "--devices", "zero"]) == 2
    assert "devices: 'zero' is not a GPU count" in capsys.readouterr().err
    if not cli_cuda():
        assert cli.main(["--model", str(model_dir), "--devices", "2", "--port", str(free_port())]) == 1
        assert "devices: asks for GPU(s) [0, 1] but CUDA is not available" in capsys.readouterr().err
    assert cli.main(["--model", str(model_dir), "--devices", "0,1", "--workers", "2", "--print-config"]) == 0
    assert "devices: 0,1\nworkers: 2\n" in capsys.readouterr().out


def cli_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# -- where the workers go -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "settings, cuda, expected",
    [
        ({}, False, ("cpu", [0], 1)),
        ({"workers": 3}, False, ("cpu", [0], 3)),
        ({}, True, ("cuda", [0], 1)),
        ({"device": "cuda:1", "workers": 2}, True, ("cuda", [1], 2)),
        ({"device": "cuda"}, True, ("cuda", [0], 1)),
        ({"devices": 2}, True, ("cuda", [0, 1], 1)),
        ({"devices": "1,3", "workers": 2}, True, ("cuda", [1, 3], 2)),
        ({"device": "cpu", "workers": 2}, True, ("cpu", [0], 2)),
    ],
)
def test_placement(settings, cuda, expected):
    assert placement(build_config(model="m", **settings), cuda) == expected


def test_pin_gpu_hides_the_other_gpus(monkeypatch):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("CUDA already started in this process")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert pin_gpu("cuda:1") == "cuda:0"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert pin_gpu("cuda:2") == "cuda:0"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2"
    assert pin_gpu("cpu") == "cpu"


# -- the control plane --------------------------------------------------------------------------
ENGINE = {
    "active_requests": 1,
    "running": 1,
    "pages_total": 100,
    "pages_used": 10,
    "page_size": 16,
    "prefix_cache_hit_rate": 0.5,
    "generated_tokens": 7,
    "tokens_per_s": 10.0,
    "weights_version": 0,
    "max_model_len": 2048,
}


def test_combine_stats_sums_counts_and_keeps_limits():
    a = {"worker": 0, "stats": ENGINE}
    b = {
        "worker": 1,
        "stats": {
            **ENGINE,
            "pages_total": 50,
            "prefix_cache_hit_rate": 0.0,
            "generated_tokens": 3,
            "max_model_len": 1024,
        },
    }
    both = combine_stats([a, b])
    assert both["pages_total"] == 150 and both["generated_tokens"] == 10 and both["tokens_per_s"] == 20.0
    assert both["max_model_len"] == 1024 and both["page_size"] == 16 and both["prefix_cache_hit_rate"] == 0.25
    assert combine_stats([a]) == ENGINE
    assert combine_stats([a, {"worker": 1, "error": "no answer"}]) == ENGINE
    assert combine_stats([{"worker": 0, "error": "no answer"}]) == {}


class FakeWorker:
    """The worker side of the control plane in a thread of this process: what it was asked."""

    def __init__(self, control: ControlPlane, worker_id: int, generated: int) -> None:
        self.aborted: list[str] = []
        self.generated = generated
        self.got_abort = threading.Event()
        control.serve(
            worker_id, self.abort, lambda: {"device": "cpu", "stats": {**ENGINE, "generated_tokens": self.generated}}
        )

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.got_abort.set()


def test_aborts_reach_every_worker_and_stats_come_from_each():
    control = ControlPlane(3)
    workers = [FakeWorker(control, i, generated=10 * (i + 1)) for i in range(2)]  # worker 2 never answers
    control.abort("req-1")
    for w in workers:
        assert w.got_abort.wait(10)
        assert w.aborted == ["req-1"]
    start = time.monotonic()
    answers = control.stats(timeout=1.0)
    assert time.monotonic() - start < 5
    assert [a["worker"] for a in answers] == [0, 1, 2]
    assert [a["stats"]["generated_tokens"] for a in answers[:2]] == [10, 20]
    assert answers[2] == {"worker": 2, "error": "no answer within 1 s"}
    assert combine_stats(answers)["generated_tokens"] == 30


def test_late_answers_do_not_leak_into_the_next_stats_call():
    control = ControlPlane(1)
    control._send(("stats", ("old-token", 0)))  # a call that timed out before the worker answered
    worker = FakeWorker(control, 0, generated=5)
    time.sleep(0.5)
    worker.generated = 6
    answers = control.stats(timeout=10)
    assert answers[0]["stats"]["generated_tokens"] == 6 and "token" not in answers[0]


def test_each_api_server_process_gets_the_stats_answers_it_asked_for():
    control = ControlPlane(2, num_consumers=3)
    workers = [FakeWorker(control, i, generated=i + 1) for i in range(2)]
    answers = control.stats(timeout=10, consumer=2)
    assert [a["stats"]["generated_tokens"] for a in answers] == [1, 2]
    workers[0].generated = 7
    assert [a["stats"]["generated_tokens"] for a in control.stats(timeout=10, consumer=0)] == [7, 2]


def test_control_plane_checks_worker_ids():
    control = ControlPlane(2)
    with pytest.raises(ValueError, match="worker id 2 outside 0..1"):
        control.serve(2, lambda r: None, dict)
    with pytest.raises(ValueError, match="num_workers must be at least 1"):
        ControlPlane(0)


def test_a_worker_started_in_a_killed_ones_place_answers_stats_and_aborts(tmp_path):
    """The control plane's sockets survive a SIGKILL of the worker at any moment: a new worker in
    the same slot answers, and no later call hangs (multiprocessing queues could be left locked
    or holding half a message)."""
    import multiprocessing as mp
    import os
    import signal

    control = ControlPlane(1, directory=str(tmp_path))
    ctx = mp.get_context("spawn")
    for generation in range(3):
        ready = ctx.Event()
        worker = ctx.Process(target=_serve_stats_forever, args=(control, generation, ready), daemon=True)
        worker.start()
        assert ready.wait(60)
        answers = control.stats(timeout=20)
        assert answers[0]["stats"]["generation"] == generation, answers
        # Hammer it with stats requests and aborts, then kill it in the middle of them.
        for i in range(200):
            control.abort(f"req-{i}")
        control.stats(timeout=0.01)
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(10)
    control.close()


def _serve_stats_forever(control: ControlPlane, generation: int, ready) -> None:
    control.serve(0, lambda request_id: None, lambda: {"stats": {"generation": generation}})
    ready.set()
    time.sleep(600)
