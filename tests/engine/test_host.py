"""Process settings for a GPU engine (engine/host_settings.py): torch CPU threads, the frozen GC,
and the caller's autocast kept out of the engine."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from engine_helpers import padded_engine, tiny_model

from astrai.core.engine import InferenceEngine, SamplingParams
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


def test_generate_inside_an_autocast_region_computes_as_outside_it():
    """A trainer generates its rollouts inside a training step, under Lightning's
    mixed-precision autocast; the engine computes in its own dtypes all the same (a float32
    engine's bfloat16 keys could not be stored in its cache before)."""
    model = tiny_model(300, seed=0)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    params = SamplingParams(n=2, temperature=1.0, max_tokens=12, seed=3, logprobs=0, ignore_eos=True)

    def sampled() -> list[tuple[list[int], list[float]]]:
        out = padded_engine(model).generate(prompts, params)
        return [(s.token_ids, [lp.logprob for lp in s.logprobs]) for c in out for s in c.samples]

    plain = sampled()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")
        under = sampled()
    assert under == plain and len(plain) == 4 and all(len(ids) == 12 for ids, _ in plain)
