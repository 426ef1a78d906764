"""A training DataLoader that Lightning can checkpoint and resume mid-epoch.

Lightning stores ``state_dict()`` of any dataloader that has one in the checkpoint and hands
it back through ``load_state_dict()`` on ``ckpt_path=...``. Ours records how many batches of
the current epoch were handed out; on resume the sampler skips exactly those samples of the
same seeded permutation, so the run continues with the batch it would have seen next.

The sampler is a ``DistributedSampler`` built with the trainer's world size and rank, so
Lightning keeps it as is under DDP/FSDP (each rank counts and skips its own batches).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """Seeded per-epoch shuffle (``set_epoch``, as Lightning calls it) that can start part-way."""

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.skip = 0  # samples of this rank to skip on the next pass only

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


class ResumableDataLoader(DataLoader):
    """DataLoader whose position inside an epoch survives a checkpoint (see module docstring).

    With another sampler (Lightning swaps in a sequential one for ``overfit_batches``) it is a
    plain DataLoader and resumes at the start of the epoch.
    """

    def __init__(self, dataset: Dataset, *args: Any, **kwargs: Any) -> None:
        super().__init__(dataset, *args, **kwargs)
        self._resumable = isinstance(self.sampler, ResumableSampler) and self.batch_size is not None
        self._done = 0  # batches of the current epoch handed out so far
        self._resume: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        if not self._resumable:
            yield from super().__iter__()
            return
        start = 0
        if self._resume is not None and self._resume["epoch"] == self.sampler.epoch:
            start = self._resume["batches"] if self._resume["batches"] < len(self) else 0
        self._resume = None
        self.sampler.skip = start * self.batch_size
        self._done = start
        for batch in super().__iter__():
            # Counted as handed out before the consumer sees it: Lightning saves checkpoints
            # after the training step, by which time this batch is done.
            self._done += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": self._done} if self._resumable else {}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if self._resumable and state:
            self._resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}
