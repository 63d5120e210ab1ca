"""Atomic file writes: a file appears complete under its name, or not at all."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_write(
    path: str | Path, mode: str = "wb", suffix: str = ".tmp", file_mode: int | None = None
) -> Iterator[IO]:
    """Write ``path`` through a temporary file in the same folder (``.<name>.<random><suffix>``), then
    flush, fsync, rename over ``path`` and fsync the folder. A process killed at any moment leaves the
    old file or the new one, never a partial one under ``path``; on an error the temporary file is removed.
    ``file_mode`` sets the permissions (``mkstemp`` creates 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        if file_mode is not None:
            os.fchmod(fd, file_mode)
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
