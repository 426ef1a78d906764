"""Process settings for a GPU engine (engine/host_settings.py): torch CPU threads and the frozen GC."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from astrai.core.engine.host_settings import limit_cpu_threads, quiet_gc


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
