"""The dtype of a model that only runs inference (GRPO's rollout engine, astrai-eval's model).

Its own module so that astrai-eval can use it without importing the training side (Lightning).
"""

from __future__ import annotations

import torch

from astrai.core.errors import require

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str | None, device: torch.device, field: str = "model.rollout_dtype") -> torch.dtype:
    """An inference model's dtype: as named, or by default bfloat16 on GPUs that have it, else
    float32. ``field``: the setting's name as the user writes it, for the error."""
    if name is None or name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    require(name in DTYPES, field, f"must be auto or one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]
