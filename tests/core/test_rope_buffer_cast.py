"""RoPE frequencies stay float32 when a wrapper casts the buffer behind the module's back.

FSDP with bf16 mixed precision (Lightning's "bf16-mixed") sets every buffer's ``.data`` to
bfloat16 without going through ``Module._apply``. bf16 inv_freq puts far positions radians away
from where they belong, so the cos/sin tables must come out as with float32 frequencies.
"""

import torch

from astrai.core.config import ModelConfig
from astrai.core.rope import RotaryEmbedding


def test_cos_sin_ignore_a_bf16_cast_of_the_frequency_buffer():
    rope = RotaryEmbedding(
        ModelConfig(vocab_size=64, dim=256, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64, max_len=4096)
    )
    positions = torch.arange(4096)[None]
    cos, sin = rope(positions, torch.float32)
    exact = rope.inv_freq.clone()
    rope.inv_freq.data = rope.inv_freq.to(torch.bfloat16)  # what FSDP's buffer cast does
    assert rope.inv_freq.dtype == torch.bfloat16
    cos_cast, sin_cast = rope(positions, torch.float32)
    torch.testing.assert_close(cos_cast, cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin_cast, sin, rtol=0, atol=1e-6)
    # The check can fail: bf16 frequencies move the last position by whole radians.
    wrong = (positions[..., None].float() * exact.to(torch.bfloat16).float())[0, -1]
    assert (wrong - positions[0, -1] * exact).abs().max() > 1.0
