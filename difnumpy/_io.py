"""Atomic file writes (convention 9): every file the library writes goes through :func:`atomic_write`."""
from __future__ import annotations

import os
import tempfile
from typing import Callable, IO


def atomic_write(path, write: Callable[[IO], None], *, binary: bool = True) -> str:
    """Write a file so that readers see either the old file or the complete new one.

    ``write(fh)`` fills a temporary file in the destination directory; it is flushed, fsynced and
    moved onto ``path`` with ``os.replace``. On any error (a full disk, a crash inside ``write``,
    Ctrl-C) the temporary file is removed and an existing ``path`` is left untouched. The new file
    keeps the mode of the file it replaces (0644 for a new one).

    Returns
    -------
    path : str
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            mode = os.stat(path).st_mode & 0o777
        except FileNotFoundError:
            mode = 0o644  # mkstemp creates 0600
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable (best effort; not possible on every platform)
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path
