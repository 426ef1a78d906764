"""Checkpoints that resume exactly, also after a run that stopped at max_steps.

Lightning's ModelCheckpoint writes its final checkpoint at the end of the epoch loop; when
max_steps stops a run mid-epoch, that checkpoint counts as end-of-epoch, and a run resumed
from it (with a larger max_steps) starts the next epoch, skipping the rest of the current
one. Saving right after the last optimizer step instead records the true position, so the
resumed run sees exactly the batches an uninterrupted run would have seen.

The checksums that catch a damaged checkpoint live in checkpoint_io.py; the one check that
needs a callback is here: FSDP reads the checkpoint without going through CheckpointIO.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint

from .checkpoint_io import loads_checkpoints_itself, verify_checkpoint


class Checkpoint(ModelCheckpoint):
    """ModelCheckpoint (same arguments) that also saves after the step that reaches max_steps,
    and checks the checkpoint a run resumes from where the strategy bypasses CheckpointIO."""

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        # Read already, but no step has run: a damaged file still stops the run before it trains on it.
        if trainer.ckpt_path and loads_checkpoints_itself(trainer.strategy):
            verify_checkpoint(trainer.ckpt_path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if 0 < trainer.max_steps <= trainer.global_step and not self._should_skip_saving_checkpoint(trainer):
            # The same two calls ModelCheckpoint makes for every_n_train_steps (Lightning 2.6).
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
