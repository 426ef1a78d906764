"""Greedy output through the engine equals a plain full-recompute loop, token for token.

Whatever the engine does to the batch (chunked prefill, requests joining mid-decode,
preemption and recompute, prefix-cache hits, forks), the tokens must not change.
"""

import pytest
import torch
import transformers
from engine_helpers import assert_pages_released, greedy_reference, random_prompts, tiny_model

from astrai.core.auto import AutoModel
from astrai.core.engine import InferenceEngine, SamplingParams

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


def check_against_reference(model, prompts, completions, max_tokens):
    for prompt, completion in zip(prompts, completions):
        assert completion.prompt_token_ids == prompt
        assert completion.token_ids == greedy_reference(model, prompt, max_tokens)
        assert completion.finish_reason == "length"


def test_mixed_lengths_with_chunked_prefill(model, tokenizer):
    # A 16-token budget forces prompts of up to 45 tokens through in several chunks, and
    # mixes those chunks with other sequences' decode steps.
    prompts = random_prompts(9, tokenizer.vocab_size, 1, 45, seed=1)
    engine = InferenceEngine(model, tokenizer, max_batch_size=4, max_num_batched_tokens=16, page_size=4)
    completions = engine.generate(prompts, GREEDY)
    check_against_reference(model, prompts, completions, 10)
    assert engine.stats()["steps"] > 10 + 45 // 16
    assert_pages_released(engine)


def test_preemption_with_a_tiny_page_pool(model, tokenizer):
    prompts = random_prompts(6, tokenizer.vocab_size, 5, 14, seed=2)
    params = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True)
    engine = InferenceEngine(model, tokenizer, max_batch_size=6, max_num_batched_tokens=64, page_size=4, num_pages=12)
    assert engine.max_model_len == 48  # capped to what the pool holds, so one sequence always fits
    completions = engine.generate(prompts, params)
    assert engine.stats()["preemptions"] > 0
    check_against_reference(model, prompts, completions, 14)
    assert_pages_released(engine)


def test_prefix_cache_hits_give_the_same_tokens(model, tokenizer):
    system = random_prompts(1, tokenizer.vocab_size, 24, 24, seed=3)[0]
    prompts = [system + tail for tail in random_prompts(5, tokenizer.vocab_size, 1, 9, seed=4)]
    engine = InferenceEngine(model, tokenizer, max_batch_size=8, page_size=8)
    first = engine.generate(prompts[:1], GREEDY)
    pages_before = engine.stats()["pages_cached"]
    rest = engine.generate(prompts[1:], GREEDY)
    stats = engine.stats()
    # Every later prompt found the 3 full pages of the shared prefix (24 of its tokens).
    assert engine.scheduler.hit_tokens == 4 * 24
    assert stats["prefix_cache_hit_rate"] > 0.4
    assert pages_before >= 3
    check_against_reference(model, prompts, first + rest, 10)
    assert_pages_released(engine)


def test_a_prompt_that_is_entirely_cached_is_still_computed_once_more(model, tokenizer):
    # The prompt fills exactly two pages; a repeat must still compute its last token for logits.
    prompt = random_prompts(1, tokenizer.vocab_size, 16, 16, seed=5)[0]
    engine = InferenceEngine(model, tokenizer, page_size=8)
    a = engine.generate([prompt], GREEDY)[0]
    b = engine.generate([prompt], GREEDY)[0]
    assert engine.scheduler.hit_tokens == 8  # the last full page is recomputed, not shared
    assert a.token_ids == b.token_ids == greedy_reference(model, prompt, 10)


def test_requests_arriving_while_others_decode(model, tokenizer):
    prompts = random_prompts(7, tokenizer.vocab_size, 2, 30, seed=6)
    engine = InferenceEngine(model, tokenizer, max_batch_size=3, max_num_batched_tokens=24, page_size=4)
    arrivals = {0: prompts[:2], 3: prompts[2:4], 5: prompts[4:5], 9: prompts[5:]}
    ids, done, step = {}, {}, 0
    while step in arrivals or step < max(arrivals) or engine.has_unfinished_requests():
        for prompt in arrivals.get(step, []):
            ids[engine.add_request(prompt, GREEDY)] = prompt
        for completion in engine.step():
            done[completion.request_id] = completion
        step += 1
        assert step < 500
    assert set(done) == set(ids)
    for request_id, prompt in ids.items():
        assert done[request_id].token_ids == greedy_reference(model, prompt, 10)
    assert_pages_released(engine)


@pytest.mark.parametrize(
    "arch",
    [
        dict(qk_norm=True, gated_attn=True, attn_bias=True),
        dict(qk_norm=True, qk_norm_after_rope=True, gated_attn=True, rope_scaling={"type": "ntk", "factor": 4.0}),
        dict(n_kv_heads=1, tie_embeddings=True),
        dict(attn_type="mla", kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16),
        dict(attn_type="mla", q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16),
        dict(ffn_type="moe", n_routed_experts=4, n_activated_experts=2, n_shared_experts=1, moe_ffn_dim=32),
    ],
    ids=["gqa-qknorm-gated-bias", "upstream-astrai-qknorm-after-rope-ntk", "mqa-tied", "mla", "mla-qlora", "moe"],
)
def test_architectures_through_the_engine(tokenizer, arch):
    model = tiny_model(tokenizer.vocab_size, seed=7, **arch)
    prompts = random_prompts(5, tokenizer.vocab_size, 3, 20, seed=8)
    engine = InferenceEngine(model, tokenizer, max_batch_size=5, max_num_batched_tokens=12, page_size=4, num_pages=14)
    completions = engine.generate(prompts, GREEDY)
    check_against_reference(model, prompts, completions, 10)
    if arch.get("attn_type") == "mla":
        layout = model.kv_layout()
        assert engine.cache.v is None and engine.cache.k.shape[-1] == layout.k_dim  # only the latent is stored
    assert_pages_released(engine)


def _randomized(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.2 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_matches_transformers_generate_on_a_hugging_face_checkpoint(tmp_path, kind):
    torch.manual_seed(11)
    common = dict(
        vocab_size=160,
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
    if kind == "llama":
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=24))
    _randomized(hf).save_pretrained(tmp_path)
    model = AutoModel.from_pretrained(tmp_path, dtype=torch.float32)
    prompts = random_prompts(4, 160, 3, 21, seed=12)
    engine = InferenceEngine(model, None, max_batch_size=3, max_num_batched_tokens=16, page_size=4, num_pages=16)
    completions = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    with torch.no_grad():
        for prompt, completion in zip(prompts, completions):
            expected = hf.generate(
                torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
            )[0, len(prompt) :].tolist()
            assert completion.token_ids == expected


def test_identical_prompts_arriving_together_compute_the_prefix_once(model, tokenizer):
    # A GRPO group sent as separate requests: the first computes the prompt, the others wait
    # one step and take its pages from the prefix cache.
    prompt = random_prompts(1, tokenizer.vocab_size, 24, 24, seed=9)[0]
    engine = InferenceEngine(model, tokenizer, page_size=8)
    completions = engine.generate([prompt] * 4, GREEDY)
    check_against_reference(model, [prompt] * 4, completions, 10)
    # 24 prompt tokens once; the 3 followers recompute only the last page (8 tokens) for logits.
    assert engine.stats()["computed_tokens"] == 24 + 3 * 8 + 4 * 9
    assert_pages_released(engine)
