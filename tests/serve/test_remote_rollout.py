"""GRPO rollouts from real `astrai-serve` subprocesses (astrai.train.remote_rollout): groups
spread over two servers come back with token ids, log-probs and weights versions; after a sync
the servers generate what the in-process engine generates with the policy's weights; a GRPO
fit with `model.rollout.servers` trains against them; and a server killed with SIGKILL in the
middle of a rollout loses no sample (its requests move to the other)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest
from conftest import API_KEY, REPO
from weights_helpers import ADMIN_KEY, new_weights, start_server

from astrai.core.auto import AutoModel
from astrai.core.config import ModelConfig
from astrai.core.engine import InferenceEngine, SamplingParams
from astrai.core.errors import AstraiError
from astrai.core.tokenizer import AutoTokenizer
from astrai.train.remote_rollout import RemoteRollout, RolloutConfig

PROMPTS = [[5, 17, 33, 8], [40, 41], [7, 7, 7, 9, 12], [100, 3], [60], [2, 90, 91]]


@pytest.fixture(scope="module")
def pair(model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("rollout-servers")
    servers = [start_server(model_dir, logs / f"server-{i}.log") for i in range(2)]
    try:
        yield [s.wait_ready() for s in servers]
    finally:
        for s in servers:
            s.stop()


def remote(pair, **options) -> RemoteRollout:
    return RemoteRollout({"servers": [s.url for s in pair], "api_key": API_KEY, "admin_key": ADMIN_KEY, **options})


def generated(server) -> int:
    return server.stats()["engine"]["generated_tokens"]


def test_groups_spread_over_two_servers_come_back_with_token_ids_logprobs_and_versions(pair):
    before = [generated(s) for s in pair]
    params = SamplingParams(n=4, max_tokens=12, temperature=1.0)
    rollout = remote(pair).generate(PROMPTS, params, seeds=list(range(len(PROMPTS))))
    assert rollout.group_ids == [g for g in range(len(PROMPTS)) for _ in range(4)]
    assert [p for p in rollout.prompt_ids[::4]] == PROMPTS
    assert all(0 < len(c) <= 12 and len(c) == len(lp) for c, lp in zip(rollout.completion_ids, rollout.logps))
    assert all(lp <= 0 for logps in rollout.logps for lp in logps)
    assert rollout.versions == [0] * len(PROMPTS) * 4
    assert all(after > b for after, b in zip(map(generated, pair), before))  # both servers took groups
    data = rollout.tensors(pad_id=0)
    assert data["input_ids"].shape[0] == len(PROMPTS) * 4 and (data["labels"] >= 0).sum() == rollout.num_tokens


def test_after_a_sync_the_servers_generate_what_the_engine_does_with_the_policy(pair, model_dir, tmp_path):
    policy = new_weights(model_dir, seed=11, path=tmp_path / "unused.safetensors")
    rollouts = remote(pair)
    rollouts.sync(policy, 3)
    assert all(s.stats()["engine"]["weights_version"] == 3 for s in pair)
    params = SamplingParams(n=1, max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=0)
    rollout = rollouts.generate(PROMPTS, params)
    engine = InferenceEngine(policy, AutoTokenizer.from_pretrained(model_dir))
    for completion, ids, logps in zip(engine.generate(PROMPTS, params), rollout.completion_ids, rollout.logps):
        assert ids == completion.token_ids
        assert logps == pytest.approx([lp.logprob for lp in completion.samples[0].logprobs], abs=1e-4)
    assert rollout.versions == [3] * len(PROMPTS)


def test_rollout_settings_are_checked_naming_the_field():
    with pytest.raises(AstraiError, match="model.rollout.servers"):
        RolloutConfig.of({"servers": []})
    with pytest.raises(AstraiError, match="model.rollout.*servrs"):
        RolloutConfig.of({"servrs": ["http://127.0.0.1:1"]})
    with pytest.raises(AstraiError, match="model.rollout.pause_mode"):
        RolloutConfig.of({"servers": ["http://127.0.0.1:1"], "pause_mode": "stop"})


def test_a_wrong_admin_key_fails_the_sync_naming_the_setting(pair, model_dir, tmp_path):
    policy = new_weights(model_dir, seed=12, path=tmp_path / "unused.safetensors")
    with pytest.raises(AstraiError, match="model.rollout.admin_key"):
        remote(pair, admin_key="wrong").sync(policy, 4)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_grpo_fit_with_model_rollout_servers_trains_against_them(pair, model_dir, tmp_path, asynchronous):
    """`astrai-train fit` with the shipped configs/train/grpo.yaml, only model.rollout added
    (and, asynchronous, generation running ahead on the servers while the trainer trains)."""
    from astrai.train.cli import main

    rows = [{"prompt": p, "answer": "good"} for p in ("one", "two", "three", "four")]
    path = tmp_path / "grpo.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    servers = ", ".join(s.url for s in pair)
    argv = [
        "fit",
        f"--config={REPO / 'configs/train/grpo.yaml'}",
        f"--model.rollout={{servers: [{servers}], api_key: {API_KEY}, admin_key: {ADMIN_KEY}}}",
        f"--model.model={model_dir}",
        f"--data.tokenizer={model_dir}",
        f"--data.train={path}",
        "--data.val=null",
        "--data.batch_size=2",
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--model.group_size=4",
        "--model.max_new_tokens=6",
        "--trainer.max_steps=2",
        "--trainer.precision=32-true",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
    ]
    if asynchronous:
        argv += ["--model.asynchronous=true", "--model.max_staleness=1", "--trainer.max_steps=3"]
    assert main(argv) == 0
    steps = 3 if asynchronous else 2
    assert [s.stats()["engine"]["weights_version"] for s in pair] == [steps, steps]  # synced after each step
    metrics = (tmp_path / "run" / "logs" / "version_0" / "metrics.csv").read_text()
    assert "train/reward" in metrics and "train/rollout_tokens_per_sec" in metrics
    if asynchronous:
        assert "train/stale_dropped" in metrics and "train/behaviour_weight" in metrics


def test_a_server_that_is_down_is_left_out_of_syncs_and_rollouts(pair, model_dir, tmp_path, free_port):
    dead = f"http://127.0.0.1:{free_port()}"
    rollouts = RemoteRollout({"servers": [dead, pair[0].url], "api_key": API_KEY, "admin_key": ADMIN_KEY})
    rollouts.sync(new_weights(model_dir, seed=13, path=tmp_path / "unused.safetensors"), 5)
    rollout = rollouts.generate(PROMPTS, SamplingParams(n=2, max_tokens=4, temperature=1.0))
    assert len(rollout.completion_ids) == len(PROMPTS) * 2 and rollout.versions == [5] * len(PROMPTS) * 2
    assert rollouts.servers[0].last_error  # the dead one, set aside with its reason
    with pytest.raises(AstraiError, match="model.rollout.servers: no server answered"):
        RemoteRollout({"servers": [dead]}).generate(PROMPTS, SamplingParams(max_tokens=2))


def test_weights_the_servers_refuse_fail_the_sync_and_leave_them_serving(pair, model_dir):
    config = AutoModel.from_pretrained(model_dir).config
    wrong = AutoModel.from_config(ModelConfig.from_dict({**config.to_dict(), "dim": 32, "n_heads": 2, "n_kv_heads": 1}))
    before = [s.stats()["engine"]["weights_version"] for s in pair]
    with pytest.raises(AstraiError, match="no server took the new weights.*shape"):
        remote(pair).sync(wrong, 99)
    assert [s.stats()["engine"]["weights_version"] for s in pair] == before
    rollout = remote(pair).generate(PROMPTS[:2], SamplingParams(n=2, max_tokens=3))  # resumed, not left paused
    assert len(rollout.completion_ids) == 4


def test_weights_a_server_cannot_read_fail_the_sync_naming_weights_dir(pair, model_dir, tmp_path):
    policy = new_weights(model_dir, seed=13, path=tmp_path / "unused.safetensors")
    rollout = remote(pair, weights_dir=str(tmp_path / "trainer-only"))
    rollout._writer.write = lambda tensors, path: None  # as if written to a disk the servers do not see
    with pytest.raises(AstraiError, match="cannot read the weights.*model.rollout.weights_dir"):
        rollout.sync(policy, 5)


def test_a_sync_interrupted_between_pause_and_resume_leaves_the_servers_serving(pair, model_dir, tmp_path):
    policy = new_weights(model_dir, seed=14, path=tmp_path / "unused.safetensors")
    rollout = remote(pair)

    def interrupt_after_pause(response):  # Ctrl-C lands while the servers are paused
        if response.request.url.path == "/admin/update_weights":
            raise KeyboardInterrupt

    rollout._client.event_hooks["response"].append(interrupt_after_pause)
    with pytest.raises(KeyboardInterrupt):
        rollout.sync(policy, 6)
    for server in pair:  # a paused server would hold this request until the timeout
        body = {"prompt": PROMPTS[0], "max_tokens": 2}
        r = httpx.post(server.url + "/v1/completions", json=body, headers=server.headers, timeout=20)
        assert r.status_code == 200, r.text


def test_a_server_killed_mid_rollout_loses_no_sample(pair):
    """Runs last: it kills one of the module's servers."""
    victim, survivor = pair
    params = SamplingParams(n=4, max_tokens=400, temperature=1.0, ignore_eos=True)
    prompts = PROMPTS * 3
    result: list = []
    worker = threading.Thread(target=lambda: result.append(remote(pair).generate(prompts, params, list(range(18)))))
    worker.start()
    deadline = time.monotonic() + 60
    while victim.stats()["engine"]["running"] == 0:
        assert time.monotonic() < deadline, "the rollout never reached the first server"
        time.sleep(0.02)
    os.killpg(victim.proc.pid, signal.SIGKILL)
    worker.join(timeout=300)
    assert victim.proc.wait(timeout=10) == -signal.SIGKILL
    (rollout,) = result
    assert len(rollout.completion_ids) == len(prompts) * 4
    assert all(len(c) == 400 and len(lp) == 400 for c, lp in zip(rollout.completion_ids, rollout.logps))
    assert rollout.group_ids == [g for g in range(len(prompts)) for _ in range(4)]
    assert survivor.stats()["engine"]["active_requests"] == 0
