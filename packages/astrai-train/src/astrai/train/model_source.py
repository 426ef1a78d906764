"""What the training modules' ``model`` and ``tokenizer`` options name, built: a model
directory (ours or Hugging Face) loaded with its weights, or a ModelConfig (JSON file or
mapping) built freshly initialised around the tokenizer's vocabulary. Kept apart from
base_module.py, which calls them in CausalLMModule.__init__; DPO and GRPO build their
reference models here too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from astrai.core.auto import AutoModel
from astrai.core.config import ModelConfig
from astrai.core.tokenizer import AutoTokenizer
from astrai.core.transformer import CausalLM


def load_tokenizer(path: str | None) -> AutoTokenizer | None:
    if path is None:
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"model.tokenizer: {e}") from None


def build_model(source: str | dict[str, Any], tokenizer: AutoTokenizer | None) -> CausalLM:
    """A model directory (ours or Hugging Face) is loaded with its weights; a ModelConfig (JSON
    file or mapping) builds a freshly initialised model whose vocabulary and special-token ids
    come from the tokenizer."""
    if isinstance(source, str) and Path(source).is_dir():
        model = AutoModel.from_pretrained(source, dtype=torch.float32)  # fp32 master weights
        if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"model.tokenizer has {tokenizer.vocab_size} tokens but the model in {source} embeds "
                f"only {model.config.vocab_size}; use the tokenizer the model was trained with"
            )
        return model.train()
    if isinstance(source, dict):
        fields = dict(source)
    elif isinstance(source, str) and Path(source).is_file():
        fields = ModelConfig.from_json(source).to_dict()
    else:
        raise ValueError(
            f"model: {source!r} is neither a model directory nor a ModelConfig JSON file "
            "(nor a mapping of ModelConfig fields)"
        )
    if tokenizer is not None:
        fields["vocab_size"] = tokenizer.vocab_size
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if fields.get(name) is None:
                fields[name] = getattr(tokenizer, name)
    return AutoModel.from_config(ModelConfig.from_dict(fields))
