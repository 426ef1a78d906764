"""BatchedZMQTransport: worker replies reach the HTTP side complete and in order, batched per loop pass."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import pickle
import threading

import pytest
import zmq

from astrai.serve.transport import BatchedZMQTransport


def _reply(uid: str, i: int) -> tuple:
    return (uid, ({"events": [{"text": f"t{i}"}]}, "OK", "STREAMING", 0))


async def _receive(transport: BatchedZMQTransport, count: int, consumer_id: int = 0) -> list:
    return [await transport.areceive(consumer_id, timeout=20) for _ in range(count)]


def test_sync_sends_arrive_in_order(tmp_path):
    transport = BatchedZMQTransport(1, directory=str(tmp_path))

    async def main():
        receiving = asyncio.ensure_future(_receive(transport, 50))
        await asyncio.sleep(0.05)  # the PULL socket binds on the first areceive
        sender = threading.Thread(target=lambda: [transport.send(_reply("a", i), 0) for i in range(50)])
        sender.start()
        got = await receiving
        sender.join()
        return got

    try:
        assert asyncio.run(main()) == [_reply("a", i) for i in range(50)]
    finally:
        transport.close()


def test_sends_of_one_loop_pass_travel_as_one_message(tmp_path):
    """Replies put by tasks woken together (one engine step) are one ZeroMQ message, in put order."""
    transport = BatchedZMQTransport(1, directory=str(tmp_path))
    pull = zmq.Context.instance().socket(zmq.PULL)
    pull.bind(transport.addresses[0])
    try:

        async def step(uid: str, wake: asyncio.Event, i: int):
            await wake.wait()
            transport.send(_reply(uid, i), 0)

        async def main():
            wake = asyncio.Event()
            tasks = [asyncio.create_task(step(f"r{i}", wake, i)) for i in range(64)]
            await asyncio.sleep(0)
            wake.set()
            await asyncio.gather(*tasks)
            await asyncio.sleep(0)  # the flush runs on the next pass
            transport.send(_reply("late", 99), 0)
            await asyncio.sleep(0)

        asyncio.run(main())
        assert pull.poll(5000)
        first = pickle.loads(pull.recv())
        assert first == [_reply(f"r{i}", i) for i in range(64)]
        assert pull.poll(5000)
        assert pickle.loads(pull.recv()) == [_reply("late", 99)]
        assert not pull.poll(100)
    finally:
        pull.close(linger=0)
        transport.close()


def test_consumers_get_only_their_replies(tmp_path):
    transport = BatchedZMQTransport(2, directory=str(tmp_path))

    async def main():
        zero = asyncio.ensure_future(_receive(transport, 3, 0))
        await asyncio.sleep(0.05)
        other = BatchedZMQTransport.__new__(BatchedZMQTransport)  # a second HTTP process's copy
        other.__setstate__(transport.__getstate__())
        one = asyncio.ensure_future(_receive(other, 2, 1))
        await asyncio.sleep(0.05)
        for i in range(5):
            transport.send(_reply(f"c{i % 2}", i), i % 2)
        await asyncio.sleep(0)  # flush
        got = await asyncio.gather(zero, one)
        other.close()
        return got

    try:
        zero, one = asyncio.run(main())
    finally:
        transport.close()
    assert zero == [_reply("c0", 0), _reply("c0", 2), _reply("c0", 4)]
    assert one == [_reply("c1", 1), _reply("c1", 3)]


def _worker(transport: BatchedZMQTransport, count: int) -> None:
    async def main():
        for i in range(count):
            transport.send(_reply("w", i), 0)
            if i % 7 == 0:
                await asyncio.sleep(0)  # several batches of different sizes

    asyncio.run(main())
    transport.close()


def test_spawned_worker_reaches_the_consumer(tmp_path):
    """The transport pickles to a spawned worker (addresses only) and its batches all arrive."""
    transport = BatchedZMQTransport(1, directory=str(tmp_path))
    assert set(transport.__getstate__()) == {"addresses"}

    async def main():
        receiving = asyncio.ensure_future(_receive(transport, 200))
        await asyncio.sleep(0.05)
        proc = mp.get_context("spawn").Process(target=_worker, args=(transport, 200))
        proc.start()
        got = await receiving
        await asyncio.to_thread(proc.join, 60)
        return got, proc.exitcode

    try:
        got, code = asyncio.run(main())
    finally:
        transport.close()
    assert code == 0
    assert got == [_reply("w", i) for i in range(200)]


def test_rejects_no_consumers():
    with pytest.raises(ValueError, match="num_consumers"):
        BatchedZMQTransport(0)
