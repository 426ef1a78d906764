"""Multi-node readiness without a second machine: `astrai-train fit` as 2 "nodes" x 1 process on
127.0.0.1 (gloo, CPU), launched the two ways a cluster launches it.

- torchrun: one `python -m torch.distributed.run --nnodes 2 --nproc-per-node 1 --node-rank R
  --master-addr 127.0.0.1 --master-port P -m astrai.train.cli fit ...` per node (static rendezvous);
  Lightning finds the torchelastic variables (RANK, LOCAL_RANK, GROUP_RANK, WORLD_SIZE, ...).
- SLURM: what `srun --nodes 2 --ntasks-per-node 1` puts in each task's environment (SLURM_NTASKS,
  SLURM_NTASKS_PER_NODE, SLURM_NNODES, SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID, SLURM_JOB_NAME,
  SLURM_JOB_ID), plus MASTER_ADDR / MASTER_PORT, around a plain `python -m astrai.train.cli fit`.
  Lightning's SLURMEnvironment reads these itself and checks them against --trainer.num_nodes.

Both run with `--trainer.num_nodes=2 --trainer.devices=1 --trainer.strategy=ddp`, batch 2 per
node, for HALF steps; a second launch of both nodes resumes from last.ckpt (`--ckpt_path=last`,
read by every process) to FULL. The reference, also stopped at HALF and resumed, is one process
with batch 4, the same global batch: the ResumableSampler deals one seeded permutation of the
windows out to the global ranks, so the two nodes together read exactly the reference's windows
at every step; every window is full, so the mean of the two nodes' gradients is the reference
gradient. The loss curve and the exported weights therefore equal the one-process run up to
float32 summation order (tolerances as in test_distributed.py). Measured on CPU: 9.5e-7 (loss,
8 steps) and 1.2e-7 (weights, both exports) from the reference, for both launchers. That
equality is the proof of world size 2: a node training alone (batch 2, world size 1) logs a
step-0 loss 1.1e-2 away from the reference, 100 times the tolerance; Lightning's own "Starting
with 2 processes" line and rank 1's "GLOBAL_RANK: 1, MEMBER: 2/2" are checked too.

The first launch finds a cold data cache shared by both nodes: both nodes' local rank 0 run
prepare_data (Lightning's default, prepare_data_per_node) at the same time on the same folder,
as two nodes on one shared filesystem do. A launch whose node or process count differs from
--trainer.num_nodes / --trainer.devices must stop at start-up (cli.check_launch), with or without
a DDP strategy. The last test races four processes through the one cache file of ours that was
not written safely that way (the cleaned copy of a JSONL file with bad lines: it had one fixed
temporary name, so a second writer lost its file or read an empty one).

A hung launch (a rendezvous that never completes) is killed after LAUNCH_TIMEOUT, torchrun's
workers included (they run in sessions of their own).
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import logged_losses, pretrain_fit_args, write_text_rows

from astrai.train.cli import cli_main, main
from astrai.train.data.sources import _cleaned_copy

REPO = Path(__file__).resolve().parents[2]
HALF, FULL = 5, 8  # the first launch stops at HALF; a second one resumes from last.ckpt to FULL
LOSS_TOL = 1e-4  # float32 summation order; one node's batch alone moves step 0 by 1.1e-2
WEIGHT_TOL = 1e-5
LAUNCH_TIMEOUT = 240  # seconds for both nodes together; a hung rendezvous is killed, not waited on
NODES = 2


def fit_args(inputs, root: Path, batch_size: int, cache: Path, steps: int = HALF) -> list[str]:
    return pretrain_fit_args(inputs, root, steps, batch_size, cache, FULL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCHER_PREFIXES = ("SLURM_", "TORCHELASTIC_", "GROUP_", "ROLE_")
LAUNCHER_NAMES = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"}


def base_env() -> dict[str, str]:
    """This environment without any launcher's variables (a test run inside a SLURM job or under
    torchrun must not leak them into the other launcher's processes)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_PREFIXES) and k not in LAUNCHER_NAMES}
    return {**env, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def torchrun_nodes(args: list[str], port: int) -> list[tuple[list[str], dict[str, str]]]:
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={NODES}", "--nproc-per-node=1"]
    where = ["--master-addr=127.0.0.1", f"--master-port={port}"]
    return [
        ([*launch, f"--node-rank={rank}", *where, "-m", "astrai.train.cli", *args], base_env()) for rank in range(NODES)
    ]


def slurm_nodes(args: list[str], port: int) -> list[tuple[list[str], dict[str, str]]]:
    """The variables srun gives task `rank` of `srun --nodes 2 --ntasks-per-node 1`."""
    job = {
        "SLURM_JOB_NAME": "astrai-multinode-test",  # not "bash"/"interactive": those are not SLURM runs
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": str(NODES),
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": str(NODES),
        "SLURM_NODELIST": "127.0.0.1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    task = lambda rank: {"SLURM_PROCID": str(rank), "SLURM_NODEID": str(rank), "SLURM_LOCALID": "0"}  # noqa: E731
    return [
        ([sys.executable, "-m", "astrai.train.cli", *args], {**base_env(), **job, **task(rank)})
        for rank in range(NODES)
    ]


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc): torchrun starts its workers in sessions of their
    own, so killing torchrun's process group would leave them behind."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    for pid in [*descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def run_nodes(
    nodes: list[tuple[list[str], dict[str, str]]], logs: Path, timeout: float = LAUNCH_TIMEOUT
) -> list[tuple[int, str]]:
    """Start every node at once, wait for all within `timeout`; on a timeout or a failed node kill
    every node with all its processes (torchrun's workers included). Returns (exit code, log)."""
    procs, files = [], []
    try:
        for rank, (argv, env) in enumerate(nodes):
            files.append((logs / f"node{rank}.log").open("w"))
            procs.append(
                subprocess.Popen(
                    argv, cwd=REPO, env=env, stdout=files[-1], stderr=subprocess.STDOUT, start_new_session=True
                )
            )
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.returncode not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                kill_tree(p)
        for f in files:
            f.close()
    return [(p.returncode, (logs / f"node{rank}.log").read_text()) for rank, p in enumerate(procs)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tokenizer_dir) -> dict[str, Path | str]:
    return write_text_rows(tmp_path_factory.mktemp("multi_node_inputs"), tokenizer_dir)


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory) -> Path:
    """One process, batch 4 (the two nodes' global batch): HALF steps, then resumed to FULL."""
    root = tmp_path_factory.mktemp("one_process")
    cli_main(fit_args(inputs, root, 4, root / "cache"))
    shutil.copytree(root / "export", root / f"export-{HALF}")
    cli_main(fit_args(inputs, root, 4, root / "cache", FULL) + ["--ckpt_path=last"])
    return root


@pytest.fixture(scope="module", params=["torchrun", "slurm"])
def two_nodes(request, inputs, tmp_path_factory) -> tuple[Path, list[str]]:
    """The run as 2 nodes x 1 process, batch 2 each, HALF steps; then the same two nodes resume
    it from last.ckpt to FULL. Returns its root and the nodes' logs of the first launch."""
    root = tmp_path_factory.mktemp(f"two_nodes_{request.param}")
    flags = [f"--trainer.num_nodes={NODES}", "--trainer.devices=1", "--trainer.strategy=ddp"]
    launcher = torchrun_nodes if request.param == "torchrun" else slurm_nodes
    first = []
    for steps, resume in ((HALF, []), (FULL, ["--ckpt_path=last"])):
        logs = root / f"launch-{steps}"
        logs.mkdir()
        args = fit_args(inputs, root, 2, root / "cache", steps) + flags + resume
        results = run_nodes(launcher(args, free_port()), logs)
        for rank, (code, log) in enumerate(results):
            assert code == 0, f"node {rank} ({request.param}, to step {steps}) exited with {code}:\n{log[-6000:]}"
        if steps == HALF:
            shutil.copytree(root / "export", root / f"export-{HALF}")
            first = [log for _, log in results]
    return root, first


@pytest.mark.slow
def test_two_nodes_form_one_world_of_two_processes(two_nodes):
    root, logs = two_nodes
    assert "distributed_backend=gloo" in logs[0] and "Starting with 2 processes" in logs[0], logs[0][-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in logs[1], logs[1][-3000:]
    # Rank 0 alone writes the checkpoint, the logs and the export (all nodes share this folder here).
    assert (root / "checkpoints" / "last.ckpt").is_file() and (root / "export" / "model.safetensors").is_file()
    assert sorted(p.name for p in (root / "logs").iterdir()) == ["version_0", "version_1"]  # one per launch


@pytest.mark.slow
def test_two_nodes_log_the_one_process_loss_curve_with_the_same_global_batch_across_a_resume(two_nodes, reference):
    root, _ = two_nodes
    ref, got = logged_losses(reference), logged_losses(root)
    assert sorted(ref) == list(range(FULL)) and sorted(got) == list(range(FULL)), (ref, got)
    assert ref[0] - ref[FULL - 1] > 100 * LOSS_TOL  # the tolerance can tell the steps apart
    for step in range(FULL):
        assert got[step] == pytest.approx(ref[step], abs=LOSS_TOL), f"step {step}: {got} vs {ref}"


@pytest.mark.slow
@pytest.mark.parametrize("export", [f"export-{HALF}", "export"])
def test_two_nodes_export_the_one_process_weights(two_nodes, reference, export):
    root, _ = two_nodes
    expected = load_file(reference / export / "model.safetensors")
    got = load_file(root / export / "model.safetensors")
    assert set(got) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=WEIGHT_TOL, msg=name)


MISMATCHED_LAUNCHES = {
    # srun --nodes 2 --ntasks-per-node 1, this task 0; the flags say one node
    "slurm": {
        "SLURM_JOB_NAME": "astrai-multinode-test",
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": "2",
        "SLURM_PROCID": "0",
        "SLURM_NODEID": "0",
        "SLURM_LOCALID": "0",
    },
    # torchrun --nnodes 2 --nproc-per-node 1, node 0; the flags say one node
    "torchrun": {
        "TORCHELASTIC_RUN_ID": "astrai-multinode-test",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "GROUP_RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "1",
        "GROUP_WORLD_SIZE": "2",
    },
}


@pytest.mark.parametrize("strategy", ["auto", "ddp"])  # auto: one device, so no DDP, and no check by Lightning
@pytest.mark.parametrize("launcher", list(MISMATCHED_LAUNCHES))
def test_num_nodes_that_differs_from_the_launch_stops_before_training_with_the_fix(
    launcher, strategy, inputs, tmp_path, monkeypatch, capsys
):
    for name in [*os.environ]:
        if name.startswith(LAUNCHER_PREFIXES) or name in LAUNCHER_NAMES:
            monkeypatch.delenv(name)
    for name, value in MISMATCHED_LAUNCHES[launcher].items():
        monkeypatch.setenv(name, value)
    flags = ["--trainer.num_nodes=1", "--trainer.devices=1", f"--trainer.strategy={strategy}"]
    assert main(fit_args(inputs, tmp_path, 2, tmp_path / "cache") + flags) == 2  # before any data or step
    err = capsys.readouterr().err
    assert "astrai-train: error: trainer.num_nodes / trainer.devices:" in err, err
    assert "started 2 x 1 processes" in err and "--trainer.num_nodes=2 --trainer.devices=1" in err, err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "export").exists()


def clean_into_shared_cache(start, source: str, good: list[str], cache: str, results) -> None:
    """One node's prepare_data reaching the cleaned copy: wait for the others, then write it."""
    start.wait()
    try:
        results.put(("ok", _cleaned_copy(Path(source), good, cache).read_text(encoding="utf-8")))
    except Exception as e:  # reported to the test, which names it
        results.put(("error", repr(e)))


def test_nodes_cleaning_one_file_into_a_shared_cache_at_once_all_read_every_row(tmp_path):
    source = tmp_path / "rows.jsonl"
    source.write_text('{"text": "a row"}\nnot json\n')
    good = [f'{{"text": "row {i} {"x" * 200}"}}\n' for i in range(40_000)]  # 8 MB: the writes overlap
    ctx = multiprocessing.get_context("fork")  # this process's imports, no second start-up
    start, results = ctx.Barrier(4), ctx.Queue()
    nodes = [
        ctx.Process(target=clean_into_shared_cache, args=(start, str(source), good, str(tmp_path / "cache"), results))
        for _ in range(4)
    ]
    for node in nodes:
        node.start()
    try:
        got = [results.get(timeout=60) for _ in nodes]
    finally:
        for node in nodes:
            node.join(timeout=30)
            if node.is_alive():
                node.kill()
    assert [status for status, _ in got] == ["ok"] * 4, [g if s != "ok" else "ok" for s, g in got]
    assert all(text == "".join(good) for _, text in got), [len(text) for _, text in got]
    left = sorted(p.name for p in (tmp_path / "cache" / "astrai-cleaned").iterdir())
    assert len(left) == 1 and left[0].endswith(".jsonl"), left  # one copy, no temporary file left behind
