"""Data modules on Hugging Face ``datasets``: pre-training windows, SFT chats, DPO pairs.

Every module yields batches in the layout the training modules expect (see ``collate``):
``labels`` are already shifted (``labels[t]`` follows ``input_ids[: t + 1]``), -100 is ignored.
"""

from .base import BaseDataModule
from .collate import IGNORE
from .dpo import DPODataModule
from .pretrain import PretrainDataModule
from .records import DataError
from .sft import SFTDataModule

__all__ = ["IGNORE", "BaseDataModule", "DataError", "DPODataModule", "PretrainDataModule", "SFTDataModule"]
