"""Process settings for a GPU engine (engine/host_settings.py): torch CPU threads and the frozen GC."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from astrai.core.engine.host_settings import limit_cpu_threads, paused_gc, quiet_gc


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_a_cuda_engine_process_gets_one_cpu_thread(threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    limit_cpu_threads(torch.device("cpu"))
    assert torch.get_num_threads() == 2  # a CPU engine runs its model on those threads
    limit_cpu_threads(torch.device("cuda", 0))  # a device object only: no GPU needed
    assert torch.get_num_threads() == 1


def test_omp_num_threads_overrides_the_limit(threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    limit_cpu_threads(torch.device("cuda"))
    assert torch.get_num_threads() == 2


class _Node:
    pass


def test_quiet_gc_freezes_what_lives_and_still_collects_later_cycles():
    try:
        quiet_gc()
        assert gc.get_freeze_count() > 0
        a, b = _Node(), _Node()
        a.other, b.other = b, a  # a cycle made after the freeze
        alive = weakref.ref(a)
        del a, b
        gc.collect()
        assert alive() is None
    finally:
        gc.unfreeze()


def test_paused_gc_keeps_the_collector_off_inside_and_restores_it_after():
    collections = []

    def record(phase, info):
        if phase == "start":
            collections.append(info["generation"])

    threshold = gc.get_threshold()
    gc.callbacks.append(record)
    try:
        gc.set_threshold(1)  # a collection at every allocation while the collector is on
        with paused_gc():
            assert not gc.isenabled()
            collections.clear()  # (entering the block allocated while the collector was still on)
            garbage = [[_Node()] for _ in range(1000)]
            assert collections == []
        assert gc.isenabled()
        [_Node() for _ in range(10)]
        assert collections  # on again: the same allocations collect
        gc.disable()
        with paused_gc():  # off before: stays off after
            pass
        assert not gc.isenabled()
        gc.enable()
        del garbage
    finally:
        gc.callbacks.remove(record)
        gc.set_threshold(*threshold)
        gc.enable()


def test_generate_runs_with_the_collector_off_and_gives_it_back(monkeypatch):
    from engine_helpers import tiny_model

    from astrai.core.engine import InferenceEngine, SamplingParams

    seen = []
    engine = InferenceEngine(tiny_model(32), None, max_batch_size=2)
    step = engine.core.step

    def observed_step():
        seen.append(gc.isenabled())
        step()

    monkeypatch.setattr(engine.core, "step", observed_step)
    engine.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert seen and not any(seen)
    assert gc.isenabled()
