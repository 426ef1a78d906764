"""Deprecated: pre-training's module is `astrai.train.pretrain_module.PretrainModule` (the name
every config and document uses); `astrai.train.seq_module.SeqModule` still loads, with a warning."""

import warnings

from .pretrain_module import PretrainModule

warnings.warn(
    "astrai.train.seq_module.SeqModule is now astrai.train.pretrain_module.PretrainModule "
    "(in YAML: class_path: astrai.train.pretrain_module.PretrainModule, or the alias 'pretrain')",
    DeprecationWarning,
    stacklevel=2,
)

SeqModule = PretrainModule

__all__ = ["SeqModule"]
