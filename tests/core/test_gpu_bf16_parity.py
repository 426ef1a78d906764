"""On CUDA in bfloat16: our model and engine against transformers (skipped without CUDA).

bf16 rounding moves logits by ~1e-2, so exact equality is the wrong question. The tolerance is
measured, not guessed: transformers' own bf16 logits are compared with its float32 logits, and
ours may stray from those float32 logits at most a little more than transformers' bf16 does.
For generated tokens, a difference is allowed only where the float32 model itself hesitates:
the two candidate tokens' float32 logits are closer than twice the bf16 error transformers
itself makes at that position. Anywhere else the greedy choice is clear and must agree.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from astrai.core.auto import AutoModel
from astrai.core.engine import InferenceEngine, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SHAPE = dict(
    vocab_size=4096,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
HF_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**SHAPE, rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
    "qwen2": lambda: transformers.Qwen2Config(**SHAPE, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "qwen3": lambda: transformers.Qwen3Config(
        **SHAPE, head_dim=128, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6}
    ),
}
SLACK = 1.5  # ours may be this much further from float32 than transformers' bf16 is, plus ABS_SLACK
ABS_SLACK = 2e-2


def hf_model(kind: str, tmp_path):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[kind](), attn_implementation="sdpa")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.05)
    model.save_pretrained(tmp_path)
    return model.cuda().eval()


@pytest.mark.parametrize("kind", list(HF_CONFIGS))
def test_bf16_logits_as_close_to_float32_as_transformers(kind, tmp_path):
    theirs32 = hf_model(kind, tmp_path)
    theirs16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).cuda().eval()
    ours16 = AutoModel.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cuda").eval()
    ids = torch.randint(
        3, SHAPE["vocab_size"], (4, 300), device="cuda", generator=torch.Generator("cuda").manual_seed(1)
    )
    with torch.no_grad():
        ref = theirs32(input_ids=ids).logits.double()
        assert ref.std() > 0.5  # meaningful logits
        hf_err = (theirs16(input_ids=ids).logits.double() - ref).abs()
        our_err = (ours16(ids).double() - ref).abs()
    assert our_err.max() <= SLACK * hf_err.max() + ABS_SLACK, (our_err.max().item(), hf_err.max().item())
    assert our_err.mean() <= SLACK * hf_err.mean() + ABS_SLACK / 10, (our_err.mean().item(), hf_err.mean().item())


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_bf16_engine_greedy_matches_transformers_generate(kind, tmp_path):
    theirs32 = hf_model(kind, tmp_path)
    theirs16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).cuda().eval()
    ours = AutoModel.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cuda").eval()
    engine = InferenceEngine(ours, None, max_batch_size=16, page_size=16, kv_cache_memory="256MiB")
    gen = torch.Generator().manual_seed(2)
    prompts = [
        torch.randint(3, SHAPE["vocab_size"], (int(n),), generator=gen).tolist()
        for n in torch.randint(5, 200, (16,), generator=gen)
    ]
    new = 48
    completions = engine.generate(prompts, SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True))
    clear_mismatch = []
    with torch.no_grad():
        for prompt, c in zip(prompts, completions):
            ids = torch.tensor([prompt], device="cuda")
            expected = theirs16.generate(ids, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)[
                0, len(prompt) :
            ].tolist()
            got = list(c.token_ids)
            assert len(got) == new
            if got == expected:
                continue
            at = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
            # Judge the first difference with the float32 model on the shared prefix.
            prefix = torch.tensor([prompt + got[:at]], device="cuda")
            exact = theirs32(input_ids=prefix).logits[0, -1].double()
            bf16_error = (theirs16(input_ids=prefix).logits[0, -1].double() - exact).abs().max()
            gap = (exact[got[at]] - exact[expected[at]]).abs()
            if gap > 2 * bf16_error:
                clear_mismatch.append((at, got[at], expected[at], float(gap), float(bf16_error)))
    assert not clear_mismatch, clear_mismatch
    # How many sequences agree outright says little: random weights give many near-ties, and two
    # correct bf16 paths that round differently (ours fuses norm/RoPE/SiLU in float32) part at
    # them. Measured on H100: 1 (fused kernels) and 7 or more (torch ops) of 16 identical, every
    # difference a near-tie.
