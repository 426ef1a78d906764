"""Building an InferenceEngine's parts from an EngineConfig, and warming them up.

engine.py is the front door (requests in, results out, threads); what it serves with is put
together here once: the settings checked, the model placed and packed, the KV pool sized, the
cache, allocator, scheduler, request intake and EngineCore made, and the CUDA-graph runners
captured when the device and the model allow them.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch
from torch import nn

from ..errors import require
from ..packed_linear import pack_projections
from .attention_backend import AttentionBackend, default_backend
from .config import EngineConfig, engine_fields
from .cuda_graphs import DecodeRunner, graph_blocker
from .engine_core import EngineCore
from .host_settings import limit_cpu_threads
from .kv_dtype import pool_dtype
from .page_allocator import PageAllocator
from .paged_cache import PagedKVCache, pool_pages
from .params import SamplingParams
from .prefill_graphs import PrefillRunner
from .request_intake import RequestIntake
from .scheduler import Scheduler
from .structured_output import Grammars

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EngineParts:
    """What an InferenceEngine serves with (its attributes of the same names)."""

    config: EngineConfig
    device: torch.device
    model: nn.Module
    page_size: int
    max_batch_size: int
    max_model_len: int
    cache: PagedKVCache
    allocator: PageAllocator
    scheduler: Scheduler
    eos_ids: frozenset[int]
    intake: RequestIntake
    core: EngineCore


def build_parts(
    model: nn.Module,
    tokenizer,
    config: EngineConfig | None,
    settings: dict,
    device: str | torch.device | None,
    attention_backend: AttentionBackend | None,
) -> EngineParts:
    """Check the settings and build the engine's parts (InferenceEngine's docstring says how)."""
    unknown = sorted(set(settings) - {f.name for f in engine_fields()})
    require(not unknown, "InferenceEngine", f"has no setting {unknown}; EngineConfig's fields are its settings")
    config = (config or EngineConfig()).replace(**settings).validate()
    max_batch_size, max_num_batched_tokens, page_size = (
        config.max_batch_size,
        config.max_num_batched_tokens,
        config.page_size,
    )
    if not hasattr(model, "kv_layout") or not hasattr(model, "config"):
        raise TypeError(f"model must be a CausalLM (with .config and .kv_layout()), got {type(model).__name__}")
    model_config = model.config
    max_model_len = model_config.max_len if config.max_model_len is None else config.max_model_len
    require(
        2 <= max_model_len <= model_config.max_len,
        "max_model_len",
        f"must be an integer in [2, model max_len={model_config.max_len}], got {max_model_len!r}",
    )
    device = torch.device(device) if device is not None else next(model.parameters()).device
    limit_cpu_threads(device)
    model = model.to(device).eval()
    pack_projections(model)
    dtype = pool_dtype(config.kv_cache_dtype, next(model.parameters()).dtype, device)
    layout = model.kv_layout()
    wanted = max_batch_size * -(-max_model_len // page_size)
    pages = pool_pages(
        config.num_pages,
        config.kv_cache_bytes(),
        PagedKVCache.bytes_per_page(layout, page_size, dtype),
        wanted,
        device,
    )
    max_model_len = min(max_model_len, pages * page_size)
    cache = PagedKVCache(layout, pages, page_size, dtype, device)
    allocator = PageAllocator(pages)
    scheduler = Scheduler(allocator, page_size, max_batch_size, max_num_batched_tokens)
    eos_ids = frozenset(tokenizer.stop_token_ids if tokenizer is not None else _config_eos(model_config))
    grammars = Grammars(tokenizer, model_config.vocab_size, eos_ids)
    intake = RequestIntake(tokenizer, model_config.vocab_size, max_model_len, max_batch_size, eos_ids, device, grammars)
    core = EngineCore(model, tokenizer, cache, scheduler, attention_backend or default_backend(device), device)
    core.grammars = grammars
    core.num_scheduler_steps = config.num_scheduler_steps or 1
    if _use_cuda_graphs(config.cuda_graphs, device, model, core.backend):
        core.decode_runner = DecodeRunner(model, cache, core.backend, max_batch_size, max_model_len, capture=True)
        if config.prefill_graphs is not False:
            core.prefill_runner = PrefillRunner(
                model,
                cache,
                core.backend,
                max_batch_size,
                max_num_batched_tokens,
                max_model_len,
                capture=True,
            )
    else:
        require(
            config.prefill_graphs is not True,
            "prefill_graphs",
            "(True) needs the decode CUDA graphs: a CUDA device, cuda_graphs not False and a model "
            "they can capture (see the log line); leave prefill_graphs None or False",
        )
    return EngineParts(
        config,
        device,
        model,
        page_size,
        max_batch_size,
        max_model_len,
        cache,
        allocator,
        scheduler,
        eos_ids,
        intake,
        core,
    )


def warm_up(engine) -> None:
    """Run two tiny requests so that the first real ones do not wait for kernels to compile:
    Triton compiles a kernel again for a size that is 1, a multiple of 16 or neither (about
    a second each, once per machine thanks to its disk cache), and prefill and mixed steps
    meet sizes the captured decode steps did not. Leaves no trace in stats or the prefix cache."""
    start = time.perf_counter()
    vocab = engine.model.config.vocab_size
    for n in (31, 48):  # a prefill of neither kind, then one of a multiple of 16
        if n < engine.max_model_len:
            # logprobs=0: the chosen-token log-prob kernel too (rollouts ask for it)
            params = SamplingParams(max_tokens=2, ignore_eos=True, logprobs=0)
            engine.generate([[(n + 7 * i) % vocab for i in range(n)]], params)
    engine.core.reset_stats()
    engine.scheduler.reset_prefix_cache()
    log.info("warm-up requests ran in %.2f s", time.perf_counter() - start)


def _use_cuda_graphs(wanted: bool | None, device: torch.device, model: nn.Module, backend: AttentionBackend) -> bool:
    if wanted is False:
        return False
    if device.type != "cuda":
        require(
            wanted is None,
            "cuda_graphs",
            f"(True) needs a CUDA device, but the engine runs on {device}; leave it None (auto) or set it False",
        )
        return False
    blocker = graph_blocker(model, backend)
    if blocker is not None:
        log.log(logging.WARNING if wanted else logging.INFO, "CUDA graphs off, decode runs eagerly: %s", blocker)
        return False
    return True


def _config_eos(config) -> list[int]:
    eos = config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
