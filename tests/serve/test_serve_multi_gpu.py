"""`astrai-serve --devices 2` on two GPUs: one engine on each, requests spread over both.

Skips without two CUDA devices. Checks that each worker reports its own GPU (a different
CUDA_VISIBLE_DEVICES, weights in its memory), that concurrent requests through the official
openai client all succeed, that both engines generate, and that greedy answers do not depend
on the GPU that produced them.
"""

from __future__ import annotations

import asyncio
import os

import openai
import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
]


@pytest.fixture
def two_gpus(launch, model_dir, serve_command, free_port, tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "TOKENIZERS_PARALLELISM": "false",
        # Multicast stays off on shared machines, also for whatever this server starts.
        "NCCL_NVLS_ENABLE": "0",
        "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
        "NVSHMEM_DISABLE_NVLS": "1",
    }
    argv = serve_command(
        "--model",
        model_dir,
        "--port",
        port,
        "--devices",
        "2",
        "--served-model-name",
        "tiny",
        "--max-batch-size",
        "32",
        "--kv-cache-memory",
        "1GiB",
        "--log-level",
        "info",
    )
    server = launch(argv, port, tmp_path / "server.log", model_dir, env=env)
    try:
        yield server.wait_ready(timeout=300)
    finally:
        server.stop()


def test_one_engine_per_gpu_and_requests_spread_over_both(two_gpus):
    stats = two_gpus.stats()
    workers = stats["workers"]
    assert stats["engines"] == 2 and [w["device"] for w in workers] == ["cuda:0", "cuda:1"], stats
    parent = os.environ.get("CUDA_VISIBLE_DEVICES")
    physical = parent.split(",")[:2] if parent else ["0", "1"]
    assert [w["cuda_visible_devices"] for w in workers] == physical, workers
    assert all(w["gpu_memory_allocated"] > 0 for w in workers), workers  # weights + KV cache on each
    log = two_gpus.log.read_text()
    assert "worker 0:" in log and "worker 1:" in log and "on cuda:1" in log, log

    different = [[{"role": "user", "content": f"count {i} {'ab' * (i % 5)}"}] for i in range(32)]
    same = [{"role": "user", "content": "the same question every time"}]

    async def ask(client, messages):
        r = await client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
        )
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens

    async def run_all():
        async with openai.AsyncOpenAI(base_url=two_gpus.url + "/v1", api_key="none", max_retries=0) as client:
            return await asyncio.gather(*(ask(client, m) for m in different + [same] * 16))

    answers = asyncio.run(run_all())
    assert all(finish == "length" and tokens == 24 for _, finish, tokens in answers), answers
    assert len({text for text, _, _ in answers[32:]}) == 1, answers[32:]  # the same on either GPU

    stats = two_gpus.stats()
    generated = [w["stats"]["generated_tokens"] for w in stats["workers"]]
    assert all(g > 0 for g in generated), stats  # both engines took requests
    assert stats["engine"]["generated_tokens"] == sum(generated) == 24 * len(answers)
