"""How long a GRPO weight sync to a running `astrai-serve` takes: the trainer writes the policy
(safetensors, in /dev/shm when it exists), then the server pauses, loads it and resumes
(astrai.serve.admin, driven by astrai.train.remote_rollout.RemoteRollout.sync). Issue 21 asks
well under a second for a 0.5B model on one host.

    uv run python bench/weight_update.py                                   # tiny model, CPU
    python3 bench/weight_update.py --model configs/model/qwen2.5-0.5b.json --device cuda

Models from a ModelConfig JSON get random weights and a small trained tokenizer (as
bench/serve_load.py makes them). The policy is another random model of the same shape on
--trainer-device. Each sync is timed end to end, and split into the trainer's write and each
admin call (the worker's own load and copy times come from its answer); `--in-flight N` keeps
N long requests generating during the syncs (pause mode interrupt holds them). The first sync
is a warm-up; the median of the others is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import prepare_model, start_server, stop_server  # noqa: E402 - bench/ scripts share helpers

from astrai.core.auto import AutoModel  # noqa: E402
from astrai.train.remote_rollout import RemoteRollout  # noqa: E402

ADMIN_KEY = "bench-admin"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="configs/model/tiny.json", help="model directory or ModelConfig JSON")
    p.add_argument("--device", default="cpu", help="the server's device (cpu, cuda, cuda:1)")
    p.add_argument("--trainer-device", default=None, help="where the policy lives (default: --device)")
    p.add_argument("--dtype", default="auto", help="server dtype: auto (bfloat16 on CUDA), float32, bfloat16")
    p.add_argument("--policy-dtype", default="auto", help="the trainer's weights: auto (bfloat16 on CUDA), float32")
    p.add_argument("--repeats", type=int, default=6, help="syncs (the first is a warm-up)")
    p.add_argument("--in-flight", type=int, default=0, help="long requests generating during the syncs")
    p.add_argument("--pause-mode", default="interrupt", choices=("interrupt", "finish"))
    p.add_argument("--max-batch-size", type=int, default=64)
    # start_server (bench/serve_load.py) reads these
    p.add_argument("--devices", type=int, default=None)
    p.add_argument("--api-key", default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--server-arg", action="append", default=[])
    return p.parse_args(argv)


def _dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def keep_busy(url: str, count: int, stop: threading.Event) -> list[threading.Thread]:
    """`count` clients that each send long requests one after another until `stop`."""

    def client() -> None:
        body = {"prompt": [5, 6, 7, 8], "max_tokens": 256, "ignore_eos": True, "temperature": 1.0}
        while not stop.is_set():
            httpx.post(url + "/v1/completions", json=body, timeout=600)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(count)]
    for t in threads:
        t.start()
    return threads


def timed_sync(rollout: RemoteRollout, policy, version: int) -> dict:
    """One sync, as RemoteRollout.sync does it, with each part timed."""
    server = rollout.servers[0]
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    if next(policy.parameters()).is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    rollout._write(rollout_state(policy))
    out = {"write_s": time.perf_counter() - start}
    path = str(rollout.weights_dir / "model.safetensors")
    for op, body in (
        ("pause", {"mode": rollout.config.pause_mode}),
        ("update_weights", {"path": path, "version": version}),
        ("resume", {}),
    ):
        t = time.perf_counter()
        r = rollout._client.post(f"{server.url}/admin/{op}", json=body, headers=headers)
        r.raise_for_status()
        out[f"{op}_s"] = time.perf_counter() - t
        if op == "update_weights":
            worker = r.json()["workers"][0]
            out["worker_load_s"], out["worker_update_s"] = worker["load_seconds"], worker["seconds"]
        if op == "pause":
            out["held_requests"] = r.json()["workers"][0]["held"]
    out["total_s"] = time.perf_counter() - start
    return out


def rollout_state(policy) -> dict:
    return {k: v.detach() for k, v in policy.state_dict().items()}


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.server_arg = [*args.server_arg, f"--admin-key={ADMIN_KEY}"]
    trainer_device = args.trainer_device or args.device
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = prepare_model(args.model, Path(tmp))
        proc, url = start_server(args, model_dir, Path(tmp) / "server.log")
        stop = threading.Event()
        try:
            base = AutoModel.from_pretrained(model_dir)
            torch.manual_seed(1)
            policy = AutoModel.from_config(base.config, dtype=_dtype(args.policy_dtype, trainer_device))
            policy = policy.to(trainer_device)
            del base
            params = sum(p.numel() for p in policy.parameters())
            rollout = RemoteRollout({"servers": [url], "admin_key": ADMIN_KEY, "pause_mode": args.pause_mode})
            keep_busy(url, args.in_flight, stop)
            if args.in_flight:
                time.sleep(2.0)
            runs = [timed_sync(rollout, policy, version) for version in range(1, args.repeats + 1)]
            start = time.perf_counter()
            rollout.sync(policy, args.repeats + 1)  # the trainer's own call, end to end
            sync_s = time.perf_counter() - start
            file_bytes = (rollout.weights_dir / "model.safetensors").stat().st_size
        finally:
            stop.set()
            stop_server(proc)
    warm = runs[1:] or runs
    result = {
        "model": args.model,
        "parameters": params,
        "server_device": args.device,
        "trainer_device": trainer_device,
        "policy_dtype": str(next(policy.parameters()).dtype).removeprefix("torch."),
        "file_bytes": file_bytes,
        "weights_dir": str(rollout.weights_dir),
        "in_flight": args.in_flight,
        "pause_mode": args.pause_mode,
        "median": {k: statistics.median(r[k] for r in warm) for k in warm[0]},
        "remote_rollout_sync_s": sync_s,
        "runs": runs,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
