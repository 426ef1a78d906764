"""The policy's weights as one safetensors file, written fast, for the rollout servers
(remote_rollout.py), which read it with safetensors' own load_file (astrai.serve.admin).

Why not safetensors.torch.save_file: the caller first copies every tensor to the host, one
copy at a time and each waiting for the device, and save_file then serialises them into a
second buffer before writing it. Here the tensors go into one pinned host buffer in
asynchronous copies with a single wait, and the file is the header followed by that buffer: the
same format, one host copy instead of three. The buffer is kept for the next sync, which writes
the same shapes.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class WeightsWriter:
    """Writes state dicts (no two tensors sharing storage) as safetensors files; reuse one
    writer for a run's syncs so that its pinned buffer is allocated once."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def write(self, tensors: dict[str, torch.Tensor], path: str | Path) -> None:
        """Write `tensors` to `path` (replaced whole: written under another name first)."""
        # Larger items first: every tensor then starts at a multiple of its item size, so it can
        # be viewed in place in the byte buffer (safetensors allows no gaps to pad with).
        names = sorted(tensors, key=lambda n: -tensors[n].element_size())
        header: dict = {"__metadata__": {"format": "pt"}}
        end = 0
        for name in names:
            t = tensors[name]
            if t.dtype not in SAFETENSORS_DTYPES:
                raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
            start, end = end, end + t.numel() * t.element_size()
            header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [start, end]}
        buffer = self._host_buffer(end)
        for name in names:
            t = tensors[name]
            start, stop = header[name]["data_offsets"]
            buffer[start:stop].view(t.dtype).view(t.shape).copy_(t.detach(), non_blocking=True)
        for device in {t.device for t in tensors.values() if t.is_cuda}:
            torch.cuda.synchronize(device)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        partial = Path(str(path) + ".partial")
        with open(partial, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            f.write(memoryview(buffer[:end].numpy()))
        os.replace(partial, path)

    def _host_buffer(self, size: int) -> torch.Tensor:
        if self._buffer is None or self._buffer.numel() < size:
            self._buffer = None  # free the old one first
            self._buffer = torch.empty(max(size, 1), dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        return self._buffer
