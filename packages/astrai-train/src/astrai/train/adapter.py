"""LoRA adapters on their own: save just the adapter weights and their config from a run, and
load them onto a base model directory.

An adapter directory holds two files in the layout of Hugging Face PEFT:

    adapter_config.json          {"peft_type": "LORA", "r", "lora_alpha", "lora_dropout",
                                  "target_modules", "base_model_name_or_path", ...}
    adapter_model.safetensors    base_model.model.<layer>.lora_A.weight (rank, in)
                                 base_model.model.<layer>.lora_B.weight (out, rank)

Our layer names are the Hugging Face Llama names, so the keys are those PEFT writes for the same
model. Loading is strict: every adapted layer of the model must get both matrices, of the right
shapes, and the file may hold nothing else; a mismatch names the key.

    python -m astrai.train.adapter merge BASE_DIR ADAPTER_DIR OUT_DIR   # a servable merged model
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from astrai.core.errors import AstraiError, require
from astrai.core.integrity import fsync_dir

from .lora import ALL_LINEAR, LoRAConfig, LoRALinear, apply_lora, lora_layers, merge_lora

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_SUFFIXES = (".lora_A", ".lora_B")


class AdapterError(AstraiError):
    """An adapter directory that does not fit the model or cannot be read; the message names the
    file, key or field."""


def adapter_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA matrices of a model state dict (keys ``<layer>.lora_A`` / ``.lora_B``)."""
    return {k: v for k, v in state_dict.items() if k.endswith(_SUFFIXES)}


def _file_key(key: str) -> str:
    return f"{_PREFIX}{key}.weight"


def _model_key(key: str) -> str:
    return key.removeprefix(_PREFIX).removesuffix(".weight")


def save_adapter(
    weights: nn.Module | dict[str, torch.Tensor],
    config: LoRAConfig,
    path: str | Path,
    base_model: str | None = None,
) -> Path:
    """Write the LoRA matrices of ``weights`` (a model with adapters, or its state dict) and
    ``config`` to the directory ``path``; returns it. Files are written next to the target
    and then swapped in, so a crash never leaves a half-written adapter."""
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    tensors = {_file_key(k): v.detach().cpu().contiguous() for k, v in adapter_state_dict(state).items()}
    if not tensors:
        raise AdapterError(
            "model.export.adapter: the model has no LoRA matrices to save; set model.lora (or model.adapter)"
        )
    targets: str | list[str] = ALL_LINEAR if ALL_LINEAR in config.targets else list(config.targets)
    meta = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "modules_to_save": None,
        "base_model_name_or_path": base_model,
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    fsync_dir(path.parent)
    return path


def read_adapter_config(path: str | Path) -> LoRAConfig:
    """The LoRAConfig saved in an adapter directory (ours or a PEFT LoRA one)."""
    file = Path(path) / ADAPTER_CONFIG
    if not file.is_file():
        raise AdapterError(f"model.adapter: {path} holds no {ADAPTER_CONFIG}; is it an adapter directory?")
    try:
        raw: dict[str, Any] = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{file}: not valid JSON ({e})") from None

    def field(name: str, ok: bool, why: str) -> None:
        if not ok:
            raise AdapterError(f"{file}: field {name!r} {why}")

    field("peft_type", raw.get("peft_type", "LORA") == "LORA", f"is {raw.get('peft_type')!r}; only LoRA is supported")
    field("r", isinstance(raw.get("r"), int), f"must be the integer rank, got {raw.get('r')!r}")
    field("use_rslora", not raw.get("use_rslora"), "is true; AstrAI's LoRA scales by lora_alpha / r, not / sqrt(r)")
    field("bias", raw.get("bias", "none") == "none", f"is {raw.get('bias')!r}; only 'none' (no trained biases)")
    field("modules_to_save", not raw.get("modules_to_save"), "lists whole modules; only LoRA matrices are loaded")
    field("use_dora", not raw.get("use_dora"), "is true; DoRA adapters are not supported")
    for name in ("rank_pattern", "alpha_pattern", "layers_to_transform"):
        field(name, not raw.get(name), "is set; only one r and lora_alpha for every adapted layer are supported")
    targets = raw.get("target_modules")
    targets = [targets] if isinstance(targets, str) else targets
    field("target_modules", bool(targets), "is empty")
    try:
        return LoRAConfig(
            rank=raw["r"],
            alpha=float(raw.get("lora_alpha", 8)),  # PEFT's default
            dropout=float(raw.get("lora_dropout", 0.0)),
            targets=list(targets),
        )
    except ValueError as e:
        raise AdapterError(f"{file}: {e}") from None


def adapter_lora_config(path: str | Path, lora: LoRAConfig | None) -> LoRAConfig:
    """The LoRA config of a run that starts from the adapter in ``path`` (model.adapter): the
    saved one, with the dropout of ``lora`` (model.lora) when that is given too."""
    saved = read_adapter_config(path)
    if lora is None:
        return saved
    differ = [f for f in ("rank", "alpha", "targets") if getattr(lora, f) != getattr(saved, f)]
    require(
        not differ,
        "model.lora",
        f"differs from the config of model.adapter ({path}) in {differ}; drop model.lora (the "
        "adapter's config is used) or set only its dropout",
    )
    return replace(saved, dropout=lora.dropout)


def load_adapter(model: nn.Module, path: str | Path, config: LoRAConfig | None = None) -> LoRAConfig:
    """Put the adapter saved in ``path`` on ``model``: wrap its target layers (unless the model
    has adapters already) and load the LoRA matrices, strictly. Returns the adapter's config
    (``config``, when given, replaces the saved one, e.g. for another dropout)."""
    config = config or read_adapter_config(path)
    file = Path(path) / ADAPTER_WEIGHTS
    if not file.is_file():
        raise AdapterError(f"model.adapter: {path} holds no {ADAPTER_WEIGHTS}")
    if not lora_layers(model):
        try:
            apply_lora(model, config)
        except ValueError as e:
            raise AdapterError(f"{Path(path) / ADAPTER_CONFIG}: {e}") from None
    saved = {_model_key(k): v for k, v in load_file(str(file)).items()}
    params = adapter_state_dict(dict(model.named_parameters()))
    missing = sorted(set(params) - set(saved))
    unexpected = sorted(set(saved) - set(params))
    if missing or unexpected:
        raise AdapterError(
            f"{file} does not fit this model: "
            + (f"no weights for {len(missing)} adapted layer matrices (e.g. {missing[0]}); " if missing else "")
            + (f"{len(unexpected)} keys the model has no adapter for (e.g. {unexpected[0]}); " if unexpected else "")
            + "was it trained on another base model or with other target_modules?"
        )
    with torch.no_grad():
        for key, p in params.items():
            if tuple(saved[key].shape) != tuple(p.shape):
                raise AdapterError(
                    f"{file}: {_file_key(key)} has shape {tuple(saved[key].shape)}, the model expects "
                    f"{tuple(p.shape)}; was it trained on another base model (or with another r)?"
                )
            p.copy_(saved[key])
    for layer in model.modules():
        if isinstance(layer, LoRALinear):
            layer.scaling = config.scaling
    return config


def load_adapter_model(base: str | Path, adapter: str | Path, merge: bool = False, dtype=torch.float32) -> nn.Module:
    """The model of the directory ``base`` with the adapter of ``adapter`` on it (in eval mode);
    ``merge``: folded into plain linear layers, as an export would hold."""
    from astrai.core.auto import AutoModel

    model = AutoModel.from_pretrained(str(base), dtype=dtype)
    load_adapter(model, adapter)
    if merge:
        merge_lora(model)
    return model.eval()


def merge_adapter(base: str | Path, adapter: str | Path, out: str | Path) -> Path:
    """Write the merged model (base + adapter) to ``out`` as a model directory, with the base's
    tokenizer when it has one: what `astrai-serve --model` and AutoModel load."""
    from astrai.core.auto import AutoModel
    from astrai.core.tokenizer import AutoTokenizer

    model = load_adapter_model(base, adapter, merge=True)
    tokenizer = AutoTokenizer.from_pretrained(str(base)) if (Path(base) / "tokenizer.json").is_file() else None
    AutoModel.save_pretrained(model, Path(out), tokenizer=tokenizer)
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m astrai.train.adapter", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="write base + adapter as one merged model directory")
    merge.add_argument("base", help="the base model directory the adapter was trained on")
    merge.add_argument("adapter", help="the adapter directory (adapter_config.json, adapter_model.safetensors)")
    merge.add_argument("out", help="where to write the merged model directory")
    args = parser.parse_args(argv)
    try:
        path = merge_adapter(args.base, args.adapter, args.out)
    except (AstraiError, FileNotFoundError) as e:
        print(f"astrai.train.adapter: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
