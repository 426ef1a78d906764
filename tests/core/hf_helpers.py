"""Helpers shared by the tests that compare our models with transformers' own classes."""

from __future__ import annotations

import torch

from astrai.core.engine import InferenceEngine, SamplingParams

ATOL = 1e-4  # fp32 logits, ours against transformers'
# A small transformers config every family's test starts from (vocabulary 128, 2 layers, GQA 4:2).
TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def assert_engine_greedy_equals_generate(ours, theirs, prompts: list[list[int]], num_pages: int, new: int = 12) -> None:
    """Our paged engine's greedy tokens for each prompt equal transformers' generate(do_sample=False)."""
    engine = InferenceEngine(ours, None, max_batch_size=3, max_num_batched_tokens=16, page_size=4, num_pages=num_pages)
    completions = engine.generate(prompts, SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))
    with torch.no_grad():
        for prompt, completion in zip(prompts, completions):
            expected = theirs.generate(
                torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0
            )[0, len(prompt) :].tolist()
            assert completion.token_ids == expected
