"""Lightning checkpoints that are checked before a run resumes from them.

Lightning reads `last.ckpt` back without any check: with 16 KiB overwritten inside the file it
still unpickles (the damage lands in tensor data), and `--ckpt_path=last` continues from wrong
weights and optimizer moments with exit status 0. ChecksummedCheckpointIO, Lightning's own
TorchCheckpointIO plus a checksum, writes `<name>.ckpt.sha256` next to every checkpoint (the
`sha256sum` format, so `sha256sum -c last.ckpt.sha256` checks it too) and compares the file
with it before reading it. A mismatch, or a file torch.load cannot read, stops the run with an
IntegrityError that names the file and the checkpoints it could resume from instead.

A checkpoint without a sidecar (written before this existed, or by another tool) is read
unchecked. Saving removes the old sidecar first and writes the new one atomically once the
checkpoint is on disk, so a run killed in between leaves a checkpoint without a sidecar, never
one with the sidecar of an older file.

Strategies that read checkpoints themselves (FSDP, ModelParallel) bypass CheckpointIO on load;
for them the Checkpoint callback calls `verify_checkpoint` once the file was read, before the
first step (see checkpointing.py).
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

from fsspec.utils import get_protocol
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.strategies import Strategy

from astrai.core.integrity import IntegrityError, atomic_write_text, fsync_file, remove_file, sha256_file

log = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".sha256"
# What torch.load raises on a damaged file: zip reader errors, broken pickles, a cut-off stream.
_UNREADABLE = (RuntimeError, pickle.UnpicklingError, EOFError)


class ChecksummedCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO that writes `<checkpoint>.sha256` after each save and checks it on load."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        remove_file(sidecar_path(path))
        super().save_checkpoint(checkpoint, path, storage_options)
        write_sidecar(path)

    def load_checkpoint(self, path, *args, **kwargs) -> dict[str, Any]:
        checked = _is_local(path) and verify_checkpoint(path)
        try:
            return super().load_checkpoint(path, *args, **kwargs)
        except _UNREADABLE as e:
            if checked:  # the bytes are the ones written: the cause is not damage
                raise
            raise IntegrityError(
                f"{path}: torch.load cannot read it ({type(e).__name__}: {_first_line(e)}); the file "
                f"is damaged or truncated. {resume_hint(path)}"
            ) from e

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        if _is_local(path):
            Path(sidecar_path(path)).unlink(missing_ok=True)


def sidecar_path(path) -> Path:
    return Path(path).with_name(Path(path).name + SIDECAR_SUFFIX)


def write_sidecar(path) -> Path:
    """Record the sha256 of a checkpoint file that is complete on disk."""
    path = Path(path)
    fsync_file(path)  # the checkpoint's bytes reach the disk before the checksum that vouches for them
    return atomic_write_text(sidecar_path(path), f"{sha256_file(path)}  {path.name}\n")


def verify_checkpoint(path) -> bool:
    """Compare a checkpoint with its sidecar: True if it matches, False if there is no sidecar
    to compare with; IntegrityError if it differs. A symlink (save_last="link") is followed."""
    file = Path(path).resolve()
    sidecar = sidecar_path(file)
    if not file.is_file() or not sidecar.is_file():
        return False
    expected = _recorded_digest(sidecar)
    if sha256_file(file) != expected:
        raise IntegrityError(
            f"{path}: its sha256 differs from the one {sidecar.name} recorded when it was saved: "
            f"the checkpoint is damaged. {resume_hint(path)} If you changed the file on purpose, "
            f"delete {sidecar} to resume from it without the check."
        )
    log.debug("%s matches %s", path, sidecar.name)
    return True


def resume_hint(path) -> str:
    """What to do instead: the other checkpoints of the same folder, newest first."""
    path = Path(path)
    others = sorted(
        (p for p in path.parent.glob("*.ckpt") if p.name != path.name and p.is_file()),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    if not others:
        return f"No other checkpoint is in {path.parent}: start the run again without --ckpt_path."
    names = ", ".join(p.name for p in others[:5])
    return (
        f"Resume from an earlier checkpoint instead (--ckpt_path={others[0]}; {path.parent} holds {names}), "
        "or start the run again without --ckpt_path."
    )


def loads_checkpoints_itself(strategy: Strategy) -> bool:
    """True for strategies whose load_checkpoint does not go through their CheckpointIO."""
    return type(strategy).load_checkpoint is not Strategy.load_checkpoint


def _recorded_digest(sidecar: Path) -> str:
    fields = sidecar.read_text(encoding="utf-8", errors="replace").split()
    if not fields or len(fields[0]) != 64 or any(c not in "0123456789abcdef" for c in fields[0]):
        raise IntegrityError(
            f"{sidecar}: not a sha256 line ('<64 hex digits>  <file name>'); the checksum file "
            f"itself is damaged. Delete it to resume from {sidecar.name[: -len(SIDECAR_SUFFIX)]} "
            "without the check, or resume from an earlier checkpoint."
        )
    return fields[0]


def _is_local(path) -> bool:
    return get_protocol(str(path)) in ("file", "local")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""
