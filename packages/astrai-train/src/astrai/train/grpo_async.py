"""Asynchronous GRPO: rollouts for later steps are generated while the trainer trains.

``RolloutProducer`` is one background thread that runs, strictly in the order the trainer
queued them, two kinds of commands on a rollout backend (anything with ``sync(policy,
version)`` and ``generate(...)``: the in-process RolloutEngine or a client of servers):

- a generation job (a prompt batch's episodes and rewards), whose result the trainer takes
  later, oldest first;
- a weight sync after an optimizer step. The trainer does not wait for it: it hands over a
  snapshot of the weights (``WeightsSnapshot``; none is copied when the producer is idle,
  the sync then runs at once) and goes on training.

Because the order is fixed, which weights version generates which batch depends only on the
order of steps, not on thread timing: runs are reproducible, and with no batch generated
ahead the producer does exactly what synchronous GRPO does.

How far ahead it may run is bounded by the staleness the run accepts (``lookahead_batches``),
and a group whose weights are older than that when it is trained is dropped
(``fresh_groups``): AReaL's bounded staleness. The loss corrects for the policy that sampled
a stale group with a truncated importance weight (``behaviour_weights``: AReaL's decoupled
PPO objective with the recomputed policy as the proximal policy).
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from astrai.core.errors import AstraiError

from .rollout import Rollout


class RolloutProducerError(AstraiError):
    """The producer thread failed (a rollout job or a weight sync); the cause is chained."""


class WeightsSnapshot:
    """The policy's weights at one optimizer step, for a backend to sync from while the trainer
    goes on updating the live ones. Duck-types what ``sync`` reads of a policy: ``state_dict()``
    and ``config``."""

    def __init__(self, policy: torch.nn.Module):
        self.config = getattr(policy, "config", None)
        clones: dict[tuple, torch.Tensor] = {}  # tied weights stay one tensor, as in the policy
        self._state = {}
        for name, tensor in policy.state_dict().items():
            key = (tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype)
            if key not in clones:
                clones[key] = tensor.detach().clone()
            self._state[name] = clones[key]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


@dataclass
class _Command:
    work: Callable[[], Any]
    ready: Any = None  # a CUDA event the trainer's stream recorded: the producer waits for it first
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None
    is_sync: bool = False


class RolloutProducer:
    """Runs generation jobs and weight syncs on ``rollout`` in a background thread, in order."""

    def __init__(self, rollout, device: torch.device | str = "cpu"):
        self.rollout = rollout
        device = torch.device(device)
        # The highest priority the device offers: a rollout step's kernels are short and paced by
        # the host, the trainer's are long; ready rollout kernels going first keeps generation
        # moving while training fills the rest of the device, instead of queueing behind it.
        self._stream = torch.cuda.Stream(device, priority=-1) if device.type == "cuda" else None
        self._cv = threading.Condition()
        self._queue: deque[_Command] = deque()  # not started yet
        self._jobs: deque[_Command] = deque()  # generation jobs not taken yet, oldest first
        self._running = False
        self._closed = False
        self._failure: BaseException | None = None
        self._threads = torch.get_num_threads()  # the same kernels' thread count as the trainer's
        self._thread = threading.Thread(target=self._loop, name="astrai-rollout-producer", daemon=True)
        self._thread.start()

    # -- the trainer's side ---------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Generation jobs submitted and not taken yet (running, queued or finished)."""
        return len(self._jobs)

    def submit(self, work: Callable[[], Any]) -> None:
        """Queue a generation job (a callable run in the producer thread); ``take`` returns its result."""
        command = _Command(work)
        self._jobs.append(command)
        self._enqueue(command)

    def take(self) -> Any:
        """The oldest job's result, waiting for it; re-raises what the job raised."""
        if not self._jobs:
            raise RolloutProducerError("RolloutProducer.take: no job was submitted")
        command = self._jobs.popleft()
        command.done.wait()
        self._raise_failure()
        if command.error is not None:
            raise command.error
        return command.result

    def publish(self, policy: torch.nn.Module, version: int) -> None:
        """Weights for the jobs queued from now on: synced at once when the producer is idle,
        else from a snapshot when the producer gets to it (a sync still waiting for its turn
        is replaced, so at most one snapshot waits between two jobs)."""
        self._raise_failure()
        with self._cv:
            idle = not self._queue and not self._running
            if idle:
                self._running = True  # keeps the thread off the backend while this thread syncs
        if idle:
            try:
                self.rollout.sync(policy, version)
            finally:
                with self._cv:
                    self._running = False
            self._mark_ready()
            return
        snapshot = WeightsSnapshot(policy)
        command = _Command(lambda: self.rollout.sync(snapshot, version), ready=self._event(), is_sync=True)
        with self._cv:
            if self._queue and self._queue[-1].is_sync:
                self._queue[-1] = command
            else:
                self._queue.append(command)
            self._cv.notify_all()

    @contextmanager
    def paused(self):
        """Wait for every queued command to finish, then hold the producer so that the caller may
        use the backend itself (validation); later commands see the caller's work."""
        with self._cv:
            self._cv.wait_for(lambda: self._closed or (not self._queue and not self._running))
            self._running = True
        try:
            if self._stream is not None:
                self._stream.synchronize()
            yield self.rollout
        finally:
            with self._cv:
                self._running = False
                self._cv.notify_all()
            self._mark_ready()
        self._raise_failure()

    def close(self) -> None:
        """Drop the generation jobs not started, finish the weight syncs (the backend ends with
        the latest weights, as after synchronous training), stop the thread."""
        with self._cv:
            for command in [c for c in self._queue if not c.is_sync]:
                command.error = RolloutProducerError("the rollout producer was closed before this job ran")
                command.done.set()
                self._queue.remove(command)
            self._cv.wait_for(lambda: not self._queue and not self._running)
            self._closed = True
            self._cv.notify_all()
        self._thread.join()
        self._jobs.clear()
        self._raise_failure()

    # -- internals ------------------------------------------------------------------------------
    def _enqueue(self, command: _Command) -> None:
        self._raise_failure()
        with self._cv:
            if self._closed:
                raise RolloutProducerError("the rollout producer is closed")
            self._queue.append(command)
            self._cv.notify_all()

    def _event(self):
        if self._stream is None:
            return None
        event = torch.cuda.Event()
        event.record()  # on the trainer's current stream
        return event

    def _mark_ready(self) -> None:
        """Make the producer's next command wait for the trainer's device work queued so far."""
        event = self._event()
        if event is not None:
            self._enqueue_wait(event)

    def _enqueue_wait(self, event) -> None:
        with self._cv:
            self._queue.append(_Command(lambda: None, ready=event, is_sync=True))
            self._cv.notify_all()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise RolloutProducerError(f"the rollout producer failed: {self._failure}") from self._failure

    def _loop(self) -> None:
        torch.set_num_threads(self._threads)
        torch.set_grad_enabled(False)
        stream = torch.cuda.stream(self._stream) if self._stream is not None else None
        if stream is not None:
            stream.__enter__()
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._closed or (self._queue and not self._running))
                if self._closed:
                    return
                command = self._queue.popleft()
                self._running = True
            try:
                if command.ready is not None:
                    self._stream.wait_event(command.ready)
                command.result = command.work()
                if self._stream is not None:
                    # The trainer reads the results, and a snapshot's memory goes back to the
                    # allocator when the command is dropped: the stream's work must be done first.
                    self._stream.synchronize()
            except BaseException as e:  # handed to the trainer, which raises it
                command.error = e
                if command.is_sync:
                    self._failure = e
            finally:
                command.done.set()
                with self._cv:
                    self._running = False
                    self._cv.notify_all()


# ---- staleness --------------------------------------------------------------------------------


def updates_per_batch(completions: int, mini_batch_size: int | None, ppo_epochs: int) -> int:
    """Optimizer steps one rollout batch of ``completions`` gives."""
    mini = min(mini_batch_size or completions, completions)
    return ppo_epochs * math.ceil(completions / mini)


def lookahead_batches(max_staleness: int, sync_interval: int, updates: int) -> int:
    """How many rollout batches may be generated ahead of the one being trained: a batch queued
    d batches ahead is trained d x ``updates`` optimizer steps later, with weights up to
    ``sync_interval - 1`` steps older still; that must stay within ``max_staleness``."""
    return max(0, (max_staleness - (sync_interval - 1)) // max(updates, 1))


def fresh_groups(versions: list[int], group_ids: list[int], current: int, max_staleness: int) -> list[int]:
    """The groups all of whose completions were generated by weights at most ``max_staleness``
    versions older than ``current``, in order."""
    stale = {g for g, v in zip(group_ids, versions) if current - v > max_staleness}
    return sorted(set(group_ids) - stale)


def select_groups(rollout: Rollout, groups: list[int]) -> tuple[Rollout, list[int]]:
    """The part of ``rollout`` that belongs to ``groups`` (renumbered 0..len-1), and the indices
    of its completions in the original."""
    new_id = {g: k for k, g in enumerate(groups)}
    rows = [i for i, g in enumerate(rollout.group_ids) if g in new_id]
    pick = lambda values: [values[i] for i in rows] if values else []  # noqa: E731
    out = Rollout(
        prompt_ids=pick(rollout.prompt_ids),
        completion_ids=pick(rollout.completion_ids),
        logps=pick(rollout.logps),
        texts=pick(rollout.texts),
        finish_reasons=pick(rollout.finish_reasons),
        group_ids=[new_id[rollout.group_ids[i]] for i in rows],
        versions=pick(rollout.versions),
        seconds=rollout.seconds,
        loss_masks=pick(rollout.loss_masks),
    )
    return out, rows


def behaviour_weights(
    proximal_logps: torch.Tensor, behaviour_logps: torch.Tensor, stale: torch.Tensor, cap: float
) -> torch.Tensor:
    """Per-token importance weights pi_proximal / pi_behaviour, truncated at ``cap``, for the
    rows ``stale`` (sampled by older weights); 1 for the rest, whose behaviour policy is the
    proximal one (their gap is only the engine's precision)."""
    weights = torch.exp(proximal_logps - behaviour_logps).clamp(max=cap)
    return torch.where(stale[:, None], weights, torch.ones_like(weights)).detach()
