"""Helpers shared by the engine tests: tiny models, a full-recompute reference loop, page checks."""

from __future__ import annotations

import pytest
import torch

from astrai.core.config import ModelConfig
from astrai.core.transformer import CausalLM

WORDS = (
    "the a small model reads and writes text every day while we watch it learn new words "
    "quickly slowly cat dog sun rain tree river stone light dark open close hello world"
).split()


# Small MLA shapes for the tests that run each path for GQA and for multi-head latent attention.
MLA = dict(attn_type="mla", kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
ARCHS = pytest.mark.parametrize("arch", [dict(), MLA], ids=["gqa", "mla"])
VOCAB = 300  # the tiny models' vocabulary in the engine tests
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def samples(completions) -> list[list[list[int]]]:
    """Every completion's samples' token ids: what two engines must agree on."""
    return [[s.token_ids for s in c.samples] for c in completions]


def tiny_config(vocab_size: int, **overrides) -> ModelConfig:
    # A large init std spreads the logits, so greedy ties (which float noise could flip) are unlikely.
    base = dict(
        vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_len=256, init_std=0.2
    )
    base.update(overrides)
    return ModelConfig(**base)


def tiny_model(vocab_size: int, seed: int = 0, **overrides) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(tiny_config(vocab_size, **overrides)).eval()


@torch.no_grad()
def full_recompute_logits(model, token_ids: list[int]) -> torch.Tensor:
    """Last-position logits of the whole sequence, with no cache at all."""
    return model(torch.tensor([token_ids]))[0, -1].float()


@torch.no_grad()
def greedy_reference(model, prompt: list[int], max_tokens: int, stop_ids=()) -> list[int]:
    """The plainest possible greedy loop: recompute everything for every token."""
    ids, out = list(prompt), []
    for _ in range(max_tokens):
        token = int(full_recompute_logits(model, ids).argmax())
        out.append(token)
        ids.append(token)
        if token in stop_ids:
            break
    return out


def padded_engine(model, tokenizer=None, **kwargs):
    """An engine whose decode steps go through DecodeRunner's static buffers without capture (on
    any device): what CUDA graphs replay, with decode steps overlapping the host's reading."""
    from astrai.core.engine import InferenceEngine
    from astrai.core.engine.cuda_graphs import DecodeRunner

    engine = InferenceEngine(model, tokenizer, **kwargs)
    engine.core.decode_runner = DecodeRunner(
        engine.model, engine.cache, engine.core.backend, engine.max_batch_size, engine.max_model_len, capture=False
    )
    return engine


def both_ways(model, prompts, params, make=padded_engine, **kwargs):
    """Completions of the plain engine and of make(model, **kwargs) (a padded engine), and the
    latter; every static-buffer runner it has must have taken steps (else nothing was compared)."""
    from astrai.core.engine import InferenceEngine

    plain = InferenceEngine(model, None, **kwargs).generate(prompts, params)
    engine = make(model, **kwargs)
    padded = engine.generate(prompts, params)
    for runner in (engine.core.decode_runner, engine.core.prefill_runner):
        assert runner is None or runner.num_steps > 0, type(runner).__name__
    return plain, padded, engine


def padded_prefill_engine(model, **kwargs):
    """padded_engine whose prefill and mixed steps also go through PrefillRunner's static buffers
    without capture: what prefill CUDA graphs replay."""
    from astrai.core.engine.prefill_graphs import PrefillRunner

    engine = padded_engine(model, **kwargs)
    engine.core.prefill_runner = PrefillRunner(
        engine.model,
        engine.cache,
        engine.core.backend,
        engine.max_batch_size,
        engine.scheduler.max_num_batched_tokens,
        engine.max_model_len,
        capture=False,
    )
    return engine


def random_prompts(n: int, vocab: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    # Skip the 5 special tokens so prompts look like text.
    return [torch.randint(5, vocab, (L,), generator=g).tolist() for L in lengths]


def assert_pages_released(engine) -> None:
    """Nothing holds a page: every page is free or merely parked in the prefix cache."""
    alloc = engine.allocator
    assert alloc.num_used == 0, engine.stats()
    assert all(c == 0 for c in alloc.refcount)
    assert alloc.num_free == alloc.num_pages
    assert not engine.scheduler.running and not engine.scheduler.waiting


def cache_pools(cache) -> list[torch.Tensor]:
    """The paged cache's key pool and, unless values live in the keys (MLA), its value pool."""
    return [cache.k] if cache.v is None else [cache.k, cache.v]


def slots_changed(before: list[torch.Tensor], cache) -> set[int]:
    """Flat slots (page * page_size + offset) whose keys or values differ, in any layer, from
    `before` (clones of cache_pools(cache))."""
    changed = set()
    for old, new in zip(before, cache_pools(cache)):
        diff = (old != new).flatten(3).any(-1).any(0)  # (pages, page_size)
        changed |= set(diff.flatten().nonzero()[:, 0].tolist())
    return changed
