"""EngineConfig: one definition of the engine's settings, taken as an object or as keywords,
checked field by field with the field named."""

from __future__ import annotations

import pytest
from engine_helpers import VOCAB, tiny_model

from astrai.core.engine import EngineConfig, InferenceEngine
from astrai.core.errors import AstraiError


def test_an_engine_config_and_the_same_keywords_build_the_same_engine():
    config = EngineConfig(max_batch_size=8, max_num_batched_tokens=64, page_size=8, num_pages=40, max_model_len=100)
    by_config = InferenceEngine(tiny_model(VOCAB), None, config)
    by_keywords = InferenceEngine(
        tiny_model(VOCAB),
        None,
        max_batch_size=8,
        max_num_batched_tokens=64,
        page_size=8,
        num_pages=40,
        max_model_len=100,
    )
    for engine in (by_config, by_keywords):
        assert (engine.max_batch_size, engine.page_size, engine.max_model_len) == (8, 8, 100)
        assert engine.cache.num_pages == 40
    assert by_config.config == by_keywords.config == config


def test_keywords_override_the_config_and_leave_it_unchanged():
    config = EngineConfig(max_batch_size=8, max_num_batched_tokens=64)
    engine = InferenceEngine(tiny_model(VOCAB), None, config, max_batch_size=4)
    assert engine.max_batch_size == 4 and engine.config.max_num_batched_tokens == 64
    assert config.max_batch_size == 8


def test_an_unknown_setting_is_refused_naming_it():
    with pytest.raises(AstraiError, match=r"InferenceEngine has no setting \['max_batch'\]"):
        InferenceEngine(tiny_model(VOCAB), None, max_batch=4)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"max_batch_size": 0}, "max_batch_size must be a positive integer, got 0"),
        ({"max_num_batched_tokens": 2.5}, "max_num_batched_tokens must be a positive integer, got 2.5"),
        ({"page_size": True}, "page_size must be a positive integer, got True"),
        ({"num_pages": -1}, "num_pages must be a positive integer or left out, got -1"),
        ({"max_model_len": "long"}, "max_model_len must be a positive integer or left out, got 'long'"),
        ({"num_scheduler_steps": 0}, "num_scheduler_steps must be a positive integer or left out, got 0"),
        (
            {"max_batch_size": 64, "max_num_batched_tokens": 32},
            r"max_num_batched_tokens \(32\) must be >= max_batch_size \(64\)",
        ),
        ({"kv_cache_dtype": "int8"}, "kv_cache_dtype must be one of 'auto', 'fp8', got 'int8'"),
        ({"num_pages": 4, "kv_cache_memory": "1MiB"}, "kv_cache_memory cannot be combined with num_pages"),
        ({"kv_cache_memory": "lots"}, "kv_cache_memory 'lots' is not a size"),
        ({"cuda_graphs": "yes"}, "cuda_graphs must be True, False or None"),
        ({"prefill_graphs": 1}, "prefill_graphs must be True, False or None"),
    ],
)
def test_each_bad_setting_is_named_before_any_model_work(settings, message):
    with pytest.raises(AstraiError, match=message):
        EngineConfig(**settings).validate()


def test_sizes_read_as_astrai_serve_and_grpo_read_them():
    assert EngineConfig(kv_cache_memory="2G").kv_cache_bytes() == 2 * 10**9
    assert EngineConfig(kv_cache_memory="1.5GiB").kv_cache_bytes() == 3 * 2**29
    assert EngineConfig(kv_cache_memory=4096).kv_cache_bytes() == 4096
    assert EngineConfig().kv_cache_bytes() is None
