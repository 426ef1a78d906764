"""EngineConfig: the settings of one InferenceEngine, defined once.

The engine takes them, `astrai-serve` makes its engine flags and YAML keys from them (with the
help text written here), and GRPO's rollout engine reads them as `model.engine` in a training
YAML, typed, so a misspelt key fails when the run starts. Each check that does not need the
model lives in `validate()`: every front end refuses a bad value with the same message.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import require
from ..sizes import parse_bytes
from .kv_dtype import KV_CACHE_DTYPES
from .request_intake import is_token_id


def _setting(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class EngineConfig:
    """How one engine batches, and how big its paged KV cache is (see each field's help)."""

    max_batch_size: int = _setting(64, "most sequences (samples) the engine runs in one step")
    max_num_batched_tokens: int = _setting(
        2048,
        "most tokens (prefill + decode) in one engine step, at least max_batch_size; longer prompts "
        "are prefilled in chunks",
    )
    page_size: int = _setting(16, "tokens per KV cache page")
    num_pages: int | None = _setting(None, "KV cache size as a page count (instead of kv_cache_memory)")
    kv_cache_memory: int | str | None = _setting(
        None,
        "memory for the paged KV cache, a byte count or a size such as 2GiB or 512MB (default: "
        "max_batch_size sequences of max_model_len, at most 0.9 of free GPU memory, 1 GiB on the CPU)",
        metavar="SIZE",
    )
    kv_cache_dtype: str = _setting(
        "auto",
        "KV cache storage: auto (the weights' dtype) or fp8 (float8 e4m3, Ada/Hopper GPUs or the "
        "CPU: twice the tokens per byte of bf16 and faster large-batch decoding; values keep ~2 "
        "significant digits)",
    )
    max_model_len: int | None = _setting(
        None, "longest prompt + completion in tokens (default and most: the model's max_len)"
    )
    cuda_graphs: bool | None = _setting(
        None,
        "run decode steps as CUDA graphs (default: on where the device and model allow, with a "
        "log line saying why not)",
    )
    prefill_graphs: bool | None = _setting(
        None, "also run prefill and mixed steps as CUDA graphs (default: whenever the decode graphs are on)"
    )
    num_scheduler_steps: int | None = _setting(
        None,
        "decode steps launched per scheduling when every running sequence is a plain decode (no "
        "grammar, penalties or top logprobs) and nothing waits: the host reads their tokens once "
        "per group, so large batches stop waiting on Python; a sample that stops inside a group "
        "wastes its rest, and new requests wait for the group to end (default: 1; GRPO's rollout "
        "engine: 8)",
    )

    def validate(self) -> EngineConfig:
        """Check every field that can be checked without the model; raises AstraiError naming it."""
        for name in ("max_batch_size", "max_num_batched_tokens", "page_size"):
            value = getattr(self, name)
            require(is_token_id(value) and value >= 1, name, f"must be a positive integer, got {value!r}")
        for name in ("num_pages", "max_model_len", "num_scheduler_steps"):
            value = getattr(self, name)
            require(
                value is None or (is_token_id(value) and value >= 1),
                name,
                f"must be a positive integer or left out, got {value!r}",
            )
        require(
            self.max_num_batched_tokens >= self.max_batch_size,
            "max_num_batched_tokens",
            f"({self.max_num_batched_tokens}) must be >= max_batch_size ({self.max_batch_size}): every "
            "running sequence needs a token of each step's budget",
        )
        require(
            self.kv_cache_dtype in KV_CACHE_DTYPES,
            "kv_cache_dtype",
            f"must be one of {', '.join(map(repr, KV_CACHE_DTYPES))}, got {self.kv_cache_dtype!r}",
        )
        require(
            self.num_pages is None or self.kv_cache_memory is None,
            "kv_cache_memory",
            "cannot be combined with num_pages: both size the KV cache; set one of them",
        )
        self.kv_cache_bytes()
        for name in ("cuda_graphs", "prefill_graphs"):
            value = getattr(self, name)
            require(
                value is None or isinstance(value, bool),
                name,
                f"must be True, False or None (on where possible), got {value!r}",
            )
        return self

    def kv_cache_bytes(self) -> int | None:
        """kv_cache_memory in bytes (None when unset)."""
        if self.kv_cache_memory is None:
            return None
        return parse_bytes(self.kv_cache_memory, "kv_cache_memory")

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)


def engine_fields() -> list[dataclasses.Field]:
    """EngineConfig's fields, with their defaults and help (for front ends that make flags)."""
    return list(dataclasses.fields(EngineConfig))
