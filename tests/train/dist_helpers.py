"""FSDP on CPU for the distributed tests (imported by the `astrai-train` processes they start).

Lightning refuses FSDP without a GPU in two places: its accelerator connector rejects
``strategy="fsdp"`` with ``accelerator="cpu"`` (it checks the exact FSDPStrategy type, so a
subclass passes), and it builds FullyShardedDataParallel with ``device_id=None`` on CPU, for
which torch looks for an accelerator and raises "FSDP needs a non-CPU accelerator device".
torch's FSDP itself shards, gathers and reduce-scatters on CPU over gloo when told the device,
so this subclass wraps the model with ``device_id=cpu`` first; Lightning's own ``_setup_model``
then sees an FSDP model and keeps it.

One more CPU-only difference: torch gathers each optimizer state of a sharded parameter
(exp_avg, then exp_avg_sq) into one reused buffer and relies on ``.cpu()`` to copy it off
the GPU; on CPU that is a no-op, so with Lightning's ``offload_to_cpu=True`` every saved
exp_avg would be the same tensor as its exp_avg_sq (and a resumed AdamW diverges to NaN).
``optimizer_state`` below asks for the full state without the offload, which clones instead.
Everything else (model state dicts, checkpoints, the export) is Lightning's FSDPStrategy.
Test-only: nobody trains with FSDP on CPU.

FirstStepGrads (below) lets a test read the gradients a multi-process run hands its optimizer.
"""

from __future__ import annotations

import os

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import (
    FullOptimStateDictConfig,
    FullStateDictConfig,
    FullyShardedDataParallel,
    OptimStateKeyType,
    StateDictType,
)

from astrai.train.pretrain_module import PretrainModule


class CPUFSDPStrategy(FSDPStrategy):
    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        kwargs = dict(self.kwargs)
        self.kwargs.pop("auto_wrap_policy", None)  # applied here; Lightning would warn about it
        model = FullyShardedDataParallel(
            model,
            sharding_strategy=self.sharding_strategy,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            device_id=torch.device("cpu"),
            **kwargs,
        )
        return super()._setup_model(model)

    def optimizer_state(self, optimizer):
        if self._state_dict_type != "full":
            return super().optimizer_state(optimizer)
        fsdp = FullyShardedDataParallel
        with fsdp.state_dict_type(
            self.model,
            StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(rank0_only=True),
            FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True),
        ):
            state = fsdp.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:  # ids in the order of the parameters, as Lightning stores them
                state = fsdp.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
        return state


class FirstStepGrads(PretrainModule):
    """PretrainModule that saves the gradients of its first optimizer step (rank 0, as float32) to
    the file named by $ASTRAI_TEST_GRADS: what the optimizer gets, after any accumulation."""

    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        if self.global_step == 0 and self.global_rank == 0:
            grads = {n: p.grad.float().cpu() for n, p in self.model.named_parameters() if p.grad is not None}
            torch.save(grads, os.environ["ASTRAI_TEST_GRADS"])
