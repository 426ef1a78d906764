"""GRPO on two trainer processes (DDP, gloo on CPU) with `model.rollout.servers`: one real
`astrai-serve` takes exactly one weight update per sync (rank 0 pushes), not one per rank, and
both ranks' rollouts come from the new weights, synchronous or asynchronous
(astrai.train.remote_rollout, "Several trainer processes"). Two ranks played by threads show
what the fit cannot (its logging collectives already keep rank 1 behind rank 0's push): a
follower's sync returns at once and its next rollout waits for the new version; a failed
first push fails every rank instead of leaving one in the broadcast; sharded strategies are
refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import API_KEY, REPO
from lightning.pytorch.strategies import DDPStrategy
from weights_helpers import ADMIN_KEY, start_server

from astrai.core.auto import AutoModel
from astrai.core.engine import SamplingParams
from astrai.core.errors import AstraiError
from astrai.train.remote_rollout import RemoteRollout, check_strategy

HERE = Path(__file__).resolve().parent
PROMPTS = [[5, 17, 33, 8], [40, 41], [7, 7, 7, 9, 12]]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = start_server(model_dir, tmp_path_factory.mktemp("ddp-rollout-server") / "server.log")
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def updates(server) -> int:
    return server.stats()["engine"]["weight_updates"]


def fit_on_two_processes(server, model_dir, tmp_path, steps: int, *extra) -> list[list[dict]]:
    """`astrai-train fit` with trainer.devices=2, strategy ddp; each rank's recorded rollouts."""
    rows = [{"prompt": p, "answer": "good"} for p in ("one", "two", "three", "four", "five", "six", "seven", "eight")]
    path = tmp_path / "grpo.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    root = tmp_path / "run"
    argv = [
        sys.executable, "-m", "astrai.train.cli", "fit",
        f"--config={REPO / 'configs/train/grpo.yaml'}",
        f"--model.rollout={{servers: [{server.url}], api_key: {API_KEY}, admin_key: {ADMIN_KEY}}}",
        f"--model.model={model_dir}", f"--data.tokenizer={model_dir}",
        f"--data.train={path}", "--data.val=null", "--data.batch_size=2", f"--data.cache_dir={tmp_path / 'cache'}",
        "--model.group_size=2", "--model.max_new_tokens=4",
        f"--trainer.max_steps={steps}", "--trainer.precision=32-true", "--trainer.accelerator=cpu",
        "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false", "--trainer.enable_model_summary=false",
        "--trainer.callbacks+=ddp_rollout_helpers.RecordRolloutVersions", f"--trainer.default_root_dir={root}",
        *extra,
    ]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.Popen(
        argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        log, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the rank it started
        log, _ = proc.communicate()
        pytest.fail(f"the two-process fit did not end within 180 s:\n{log[-4000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, log[-6000:]
    assert "Starting with 2 processes" in log or "distributed_backend=gloo" in log, log[-3000:]
    return [[json.loads(line) for line in (root / f"versions-rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]


@pytest.mark.slow
def test_ddp_grpo_pushes_the_weights_once_per_sync_and_both_ranks_sample_the_new_ones(server, model_dir, tmp_path):
    steps = 3
    before = updates(server)
    ranks = fit_on_two_processes(server, model_dir, tmp_path, steps)
    # The first sync (version 0) and one after each optimizer step: rank 0's only, not one per rank.
    assert updates(server) - before == steps + 1
    assert server.stats()["engine"]["weights_version"] == steps
    assert [r["leader"] for r in ranks[0]] == [True] * steps and [r["leader"] for r in ranks[1]] == [False] * steps
    for rank in ranks:  # rollout batch k is sampled by the weights of step k, on either rank
        assert [sorted(set(r["versions"])) for r in rank] == [[k] for k in range(steps)]


@pytest.mark.slow
def test_asynchronous_ddp_grpo_pushes_at_most_once_per_version_from_rank_0(server, model_dir, tmp_path):
    """Syncs run in each rank's producer thread: no collective there, no deadlock; rank 0's
    producer may skip a version that a newer one replaced, never push one twice."""
    steps = 3
    before = updates(server)
    ranks = fit_on_two_processes(
        server, model_dir, tmp_path, steps, "--model.asynchronous=true", "--model.max_staleness=1"
    )
    assert 2 <= updates(server) - before <= steps + 1
    assert server.stats()["engine"]["weights_version"] == steps  # the producers finish their syncs
    leader, follower = ([min(r["versions"]) for r in rank] for rank in ranks)
    # Batch j (one generated ahead of the 3 trained) is queued after the sync of version j - 1:
    # rank 0 samples exactly that, rank 1 that or a newer one, never an older one.
    assert leader == [0, 0, 1, 2]
    assert all(old <= new <= j for j, (old, new) in enumerate(zip(leader, follower)))


def test_sharded_strategies_are_refused_naming_the_fields():
    from lightning.pytorch.strategies import FSDPStrategy, SingleDeviceStrategy

    check_strategy(None)
    check_strategy(SingleDeviceStrategy("cpu"))
    check_strategy(DDPStrategy())
    with pytest.raises(AstraiError, match="model.rollout.servers.*trainer.strategy FSDPStrategy"):
        check_strategy(FSDPStrategy())
    with pytest.raises(AstraiError, match="model.rollout.servers"):
        RemoteRollout({"servers": ["http://127.0.0.1:1"]}, strategy=FSDPStrategy())


class ThreadRank(DDPStrategy):
    """One of two DDP ranks played by threads of this process: only what RemoteRollout uses."""

    world_size = 2

    def __init__(self, rank: int, shared: dict) -> None:
        self.rank, self.shared = rank, shared

    @property
    def global_rank(self) -> int:
        return self.rank

    def broadcast(self, obj, src: int = 0):
        if self.rank == src:
            self.shared["value"] = obj
        self.shared["barrier"].wait()
        value = self.shared["value"]
        self.shared["barrier"].wait()
        return value


def test_a_follower_rank_pushes_nothing_and_samples_only_once_rank_0_has_pushed(server, model_dir):
    """Rank 0 writes its weights slowly here: rank 1's sync returns at once, and its next rollout
    waits for the servers to report the new version instead of sampling the old weights."""
    shared = {"barrier": threading.Barrier(2, timeout=60)}
    config = {"servers": [server.url], "api_key": API_KEY, "admin_key": ADMIN_KEY}
    leader, follower = (RemoteRollout(config, strategy=ThreadRank(rank, shared)) for rank in (0, 1))
    assert leader.leader and not follower.leader
    policy = AutoModel.from_pretrained(model_dir)
    before = updates(server)
    first = threading.Thread(target=leader.sync, args=(policy, 10))
    first.start()
    follower.sync(policy, 10)  # the first sync: the broadcast returns once rank 0 has pushed
    first.join(timeout=60)
    assert updates(server) - before == 1 and server.stats()["engine"]["weights_version"] == 10

    write = leader._write
    leader._write = lambda state: (time.sleep(1.0), write(state))
    second = threading.Thread(target=leader.sync, args=(policy, 11))
    second.start()
    start = time.perf_counter()
    follower.sync(policy, 11)
    assert time.perf_counter() - start < 0.5  # a follower does not wait in sync (the producer's thread may run it)
    rollout = follower.generate(PROMPTS, SamplingParams(n=2, max_tokens=3))
    second.join(timeout=60)
    assert rollout.versions == [11] * len(PROMPTS) * 2
    assert updates(server) - before == 2


def test_a_first_sync_that_fails_on_rank_0_fails_on_every_rank_instead_of_hanging(server, model_dir):
    shared = {"barrier": threading.Barrier(2, timeout=60)}
    config = {"servers": [server.url], "api_key": API_KEY, "admin_key": "wrong"}
    leader, follower = (RemoteRollout(config, strategy=ThreadRank(rank, shared)) for rank in (0, 1))
    policy = AutoModel.from_pretrained(model_dir)
    errors: list = []

    def sync_leader():
        try:
            leader.sync(policy, 20)
        except AstraiError as e:
            errors.append(e)

    thread = threading.Thread(target=sync_leader)
    thread.start()
    with pytest.raises(AstraiError, match="rank 0 could not load the weights.*model.rollout.admin_key"):
        follower.sync(policy, 20)
    thread.join(timeout=60)
    assert len(errors) == 1 and "model.rollout.admin_key" in str(errors[0])
