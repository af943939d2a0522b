"""Durable file replacement: the one writer every output file and state file goes through.

A reader sees the old file or the new one, never a partial one, even after a power cut: the data goes
to a temp file beside the target, is fsynced, renamed over the target, and the folder is fsynced so
the rename itself is on disk.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .errors import EdgepackError, UsageError


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in ``folder`` durable (no-op where folders cannot be opened)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def atomic_write(path: Path, data: bytes, mode: int | None = 0o666) -> None:
    """Replace ``path`` with ``data`` durably (temp file, fsync, rename, fsync of the folder).

    ``mode`` is masked with the umask (mkstemp alone makes 0600; outputs are ordinary files).
    Raises UsageError when the folder cannot be written, EdgepackError when the write fails.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise UsageError(f"cannot write to {path.parent}: {exc.strerror}; choose a writable folder") from None
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if mode is not None:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(temp, mode & ~umask)
        os.replace(temp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        Path(temp).unlink(missing_ok=True)
        raise EdgepackError(f"cannot write {path}: {exc.strerror}") from None
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data) -> None:
    """``atomic_write`` of ``data`` as indented, key-sorted JSON."""
    atomic_write(path, json.dumps(data, indent=1, sort_keys=True).encode(), mode=0o644)


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` to disk (before a state file points at them)."""
    folder = Path(folder)
    for parent, folders, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(parent, name)
            if os.path.islink(path):
                continue
            handle = os.open(path, os.O_RDONLY)
            try:
                os.fsync(handle)
            finally:
                os.close(handle)
        fsync_dir(Path(parent))
    fsync_dir(folder.parent)


def copy_durably(source: Path, target: Path, block: int = 1 << 20) -> None:
    """Copy ``source`` to ``target`` and fsync it (the target is new; the caller owns its folder)."""
    with open(source, "rb") as reader, open(target, "wb") as writer:
        for chunk in iter(lambda: reader.read(block), b""):
            writer.write(chunk)
        writer.flush()
        os.fsync(writer.fileno())
