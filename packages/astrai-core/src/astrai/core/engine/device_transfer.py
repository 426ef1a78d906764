"""Moving a step's small inputs to the device and its results back, with as few transfers as possible.

`torch.tensor(values, device="cuda")` copies from pageable memory and waits for the device, so a
step that builds five index tensors that way stalls five times. Here a step's integers go into
one pinned host tensor and cross in one asynchronous copy; results come back through
asynchronous copies followed by a single wait, which can come later: the host reads one step's
tokens while the device already runs the next (see engine_core.py).
"""

from __future__ import annotations

import torch


def to_device(parts: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """The host tensors `parts` (one dtype) on `device`, copied in one transfer; same shapes.

    On CUDA the copy is asynchronous from pinned memory; the caching host allocator keeps the
    pinned block alive until the copy has run.
    """
    if device.type != "cuda":
        return [p.to(device) for p in parts]
    flat = torch.cat([p.reshape(-1) for p in parts]).pin_memory()
    moved = flat.to(device, non_blocking=True)
    return [v.view(p.shape) for v, p in zip(moved.split([p.numel() for p in parts]), parts)]


class HostCopy:
    """Device tensors on their way into pinned host memory; `wait()` gives their `.tolist()`.

    The copies are queued behind the work that produces the tensors, and an event marks their
    end: waiting on it does not wait for work queued later (the next step's forward pass)."""

    def __init__(self, *tensors: torch.Tensor):
        self._event = None
        if not tensors or tensors[0].device.type != "cuda":
            self._host = tensors
            return
        self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        for h, t in zip(self._host, tensors):
            h.copy_(t, non_blocking=True)  # into pinned memory: queued, not waited for
        self._event = torch.cuda.Event()
        self._event.record(torch.cuda.current_stream(tensors[0].device))

    def wait(self) -> list[list]:
        if self._event is not None:
            self._event.synchronize()
        return [h.tolist() for h in self._host]
