"""Files that are written whole or not at all, and a checksum manifest that tells a damaged
file from a good one.

A model directory is read long after it was written, often on another machine: a disk error,
an interrupted copy or a stray write can change a few KiB of weights, and safetensors loads
them without complaint (0xff bytes are NaN in every float format). So every file of an
exported directory is written atomically (a temporary file in the same directory, flushed and
fsynced, then renamed over the target, then the directory fsynced), and ``checksums.json``
records the sha256 and size of each file once it is on disk:

    {"format_version": 1, "algorithm": "sha256",
     "files": {"config.json": {"sha256": "9f2c...", "size": 812}, ...}}

Readers check the entries of the files they read; a file the manifest does not list, or a
directory without a manifest (a Hugging Face download), is read unchecked. Writers first drop
the entries of the files they are about to replace and record them again once written, so an
interrupted save leaves files that are unlisted, never files that contradict the manifest.

Lightning checkpoints use the same helpers (astrai.train.checkpoint_io), so this module uses
nothing beyond the standard library.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .errors import AstraiError

MANIFEST_FILE = "checksums.json"
FORMAT_VERSION = 1
_ALGORITHM = "sha256"
_CHUNK = 1 << 20

Entries = dict[str, dict]  # file name -> {"sha256": hex digest, "size": bytes}


class IntegrityError(AstraiError):
    """A file differs from what was recorded when it was written; the message names the file and the fix."""


# -- writing whole files ----------------------------------------------------------------------
def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file next to ``path``, then make it ``path``.

    Readers see the old file or the complete new one, never a part; after a crash the
    directory holds one or the other, and no temporary file is left behind by an error.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def fsync_file(path: str | Path) -> None:
    """Flush a written file's data to the disk (fsync works on a descriptor opened for reading)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make renames and removals in a directory durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename itself already happened
    finally:
        os.close(fd)


def remove_file(path: str | Path) -> None:
    """Delete a file if it exists, durably."""
    path = Path(path)
    if path.exists():
        path.unlink()
        fsync_dir(path.parent)


# -- hashing -------------------------------------------------------------------------------------
def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks (never the whole file in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(path: str | Path) -> dict:
    path = Path(path)
    return {_ALGORITHM: sha256_file(path), "size": path.stat().st_size}


# -- the manifest --------------------------------------------------------------------------------
def read_manifest(directory: str | Path) -> Entries | None:
    """The entries of ``directory/checksums.json``, or None when the directory has no manifest."""
    file = Path(directory) / MANIFEST_FILE
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{file}: not valid JSON ({e}); {_manifest_fix(file)}") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise IntegrityError(f"{file}: not a checksum manifest (no 'files' object); {_manifest_fix(file)}")
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise IntegrityError(
            f"{file}: format_version {version!r} is not one this astrai reads (up to "
            f"{FORMAT_VERSION}); upgrade astrai, or delete {MANIFEST_FILE} to load without checksums"
        )
    return data["files"]


def write_manifest(directory: str | Path, entries: Entries) -> Path:
    data = {"format_version": FORMAT_VERSION, "algorithm": _ALGORITHM, "files": dict(sorted(entries.items()))}
    return atomic_write_text(Path(directory) / MANIFEST_FILE, json.dumps(data, indent=2) + "\n")


def record_files(directory: str | Path, names: Iterable[str], create: bool = False) -> None:
    """Hash ``names`` (already written, in ``directory``) into the manifest.

    Without ``create`` a directory that has no manifest keeps having none: a tokenizer saved
    on its own does not start one, but one saved into a model directory keeps it up to date.
    """
    entries = read_manifest(directory)
    if entries is None and not create:
        return
    entries = dict(entries or {})
    for name in names:
        entries[name] = file_entry(Path(directory) / name)
    write_manifest(directory, entries)


def forget_files(directory: str | Path, names: Iterable[str]) -> None:
    """Drop the entries of files about to be rewritten, so a save cut short leaves them unlisted."""
    entries = read_manifest(directory)
    names = set(names)
    if entries is not None and names & set(entries):
        write_manifest(directory, {k: v for k, v in entries.items() if k not in names})


@contextlib.contextmanager
def rewriting(directory: str | Path, names: Iterable[str]) -> Iterator[None]:
    """``with rewriting(dir, names): <write names>`` keeps an existing manifest true for them."""
    names = list(names)
    forget_files(directory, names)
    yield
    record_files(directory, names)


def verify_file(directory: str | Path, name: str, entries: Entries | None) -> None:
    """Raise IntegrityError if ``directory/name`` differs from its manifest entry (if it has one)."""
    entry = (entries or {}).get(name)
    if entry is None:
        return
    file = Path(directory) / name
    if not file.is_file():
        raise IntegrityError(f"{file}: listed in {MANIFEST_FILE} but missing; {_file_fix()}")
    size, expected_size = file.stat().st_size, entry.get("size")
    if size != expected_size:
        raise IntegrityError(
            f"{file}: {size} bytes, but {MANIFEST_FILE} recorded {expected_size} when it was "
            f"written: the file is truncated or damaged; {_file_fix()}"
        )
    if sha256_file(file) != entry.get(_ALGORITHM):
        raise IntegrityError(
            f"{file}: its sha256 differs from the one {MANIFEST_FILE} recorded when it was "
            f"written: the file is damaged; {_file_fix()}"
        )


def _file_fix() -> str:
    return (
        f"export the model again (or download it again). If you changed the file on purpose, "
        f"delete {MANIFEST_FILE} to load the directory without checksums"
    )


def _manifest_fix(file: Path) -> str:
    return f"export the model again, or delete {file.name} to load the directory without checksums"
