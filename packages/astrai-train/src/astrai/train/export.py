"""Export a training module as a model directory (config.json, model.safetensors, tokenizer)
that `astrai-serve --model DIR`, `AutoModel.from_pretrained` and transformers load directly.

Works under every strategy: the state dict comes from the strategy (FSDP gathers the shards
onto rank 0), LoRA adapters are merged into their base weights, and only rank 0 writes.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from astrai.core.auto import AutoModel
from astrai.core.integrity import fsync_dir

from .lora import merge_lora_state_dict

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_model(
    module: L.LightningModule, path: str | Path, trainer: L.Trainer | None = None, dtype: str | None = None
) -> Path | None:
    """Write ``module.model`` (adapters merged) and its tokenizer to ``path``.

    Every rank must call this (gathering FSDP shards is collective); rank 0 writes and
    returns the path, the other ranks return None.
    """
    dtype = dtype or getattr(getattr(module, "export_args", None), "dtype", None)
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"model.export.dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    state = trainer.strategy.lightning_module_state_dict() if trainer is not None else module.state_dict()
    if trainer is not None and not trainer.is_global_zero:
        trainer.strategy.barrier("export")
        return None
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    lora = getattr(module, "lora_config", None)
    if lora is not None:
        weights = merge_lora_state_dict(weights, lora.scaling)
    model = AutoModel.from_config(module.model.config)  # a plain CPU copy: no adapters, no compile wrapper
    model.load_state_dict({k: v.detach().cpu() for k, v in weights.items()})
    if dtype is not None:
        model.to(_DTYPES[dtype])
    path = Path(path)
    # Write next to the target, then swap: a crash mid-export never leaves a half-written model.
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # save_pretrained writes every file atomically and checksums.json last: a loader that meets
    # damaged bytes later says which file (astrai.core.integrity).
    AutoModel.save_pretrained(model, tmp, tokenizer=getattr(module, "tokenizer", None))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    fsync_dir(path.parent)
    if trainer is not None:
        trainer.strategy.barrier("export")
    return path


def export_adapter(module: L.LightningModule, path: str | Path, trainer: L.Trainer | None = None) -> Path | None:
    """Write only the LoRA matrices of ``module.model`` and their config to ``path`` (see
    astrai.train.adapter). Every rank must call this (FSDP gathers); rank 0 writes."""
    from .adapter import save_adapter

    state = trainer.strategy.lightning_module_state_dict() if trainer is not None else module.state_dict()
    if trainer is not None and not trainer.is_global_zero:
        trainer.strategy.barrier("export_adapter")
        return None
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    source = module.hparams.get("model") if hasattr(module, "hparams") else None
    base = str(Path(source).resolve()) if isinstance(source, str) and Path(source).is_dir() else None
    path = save_adapter(weights, module.lora_config, path, base_model=base)
    if trainer is not None:
        trainer.strategy.barrier("export_adapter")
    return path


class ModelExport(Callback):
    """Export the model every ``every_n_train_steps`` optimizer steps to ``dirpath/step-NNNNNN``
    (default dirpath: <trainer.default_root_dir>/export-steps; the final export goes to
    <default_root_dir>/export), keeping the last ``keep_last`` exports (0 = all)."""

    def __init__(self, every_n_train_steps: int = 0, dirpath: str | None = None, keep_last: int = 0):
        if every_n_train_steps < 0 or keep_last < 0:
            raise ValueError("ModelExport: every_n_train_steps and keep_last must be >= 0")
        self.every_n_train_steps = every_n_train_steps
        self.dirpath = dirpath
        self.keep_last = keep_last
        self._written: list[Path] = []
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self.every_n_train_steps or step == 0 or step % self.every_n_train_steps or step == self._last_step:
            return
        self._last_step = step  # with gradient accumulation several batches end on one step
        root = Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "export-steps"
        path = export_model(pl_module, root / f"step-{step:06d}", trainer)
        if path is None:
            return
        self._written.append(path)
        while self.keep_last and len(self._written) > self.keep_last:
            shutil.rmtree(self._written.pop(0), ignore_errors=True)
