"""Opening the files a user names, safely: regular files only, bounded in size, never blocking.

A path on a clinic's share or an SD card can be a device (``/dev/zero`` never ends), a named
pipe (opening it for reading waits forever for a writer), a folder, a symlink loop or a file
that cannot be read. Each of these becomes one error naming the path, before anything is read.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO, Type

from .errors import LungedgeError

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def open_regular_file(path, *, what: str, max_bytes: int, error: Type[LungedgeError]) -> BinaryIO:
    """Open ``path`` for reading if it is a non-empty regular file of at most ``max_bytes``.

    The file is opened without blocking (a FIFO does not wait for a writer) and checked on the
    open descriptor, so what is checked is what is read.

    Args:
        path: the file.
        what: how to call it in messages ("model file", "image").
        max_bytes: the size limit.
        error: the exception class to raise.

    Returns:
        A binary file object (the caller closes it).

    Raises:
        error: missing, a folder, not a regular file, empty, too large or unreadable.
    """
    name = os.fsdecode(path) if isinstance(path, bytes) else str(path)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise error(f"{what} not found: {name!r}") from None
    except OSError as exc:
        raise error(f"cannot open {what} ({exc.strerror or type(exc).__name__}): {name!r}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise error(f"{what} is a folder, not a file: {name!r}")
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{what} is not a regular file (a device, pipe or socket): {name!r}")
        if st.st_size == 0:
            raise error(f"{what} is empty: {name!r}")
        if st.st_size > max_bytes:
            raise error(f"{what} too large ({st.st_size / 2**20:.1f} MiB, limit {max_bytes / 2**20:.0f} MiB): {name!r}")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular_file(path, *, what: str, max_bytes: int, error: Type[LungedgeError]) -> bytes:
    """The bytes of ``path`` after the checks of ``open_regular_file``; at most ``max_bytes``.

    Raises:
        error: as ``open_regular_file``, or a read error (a failing SD card gives EIO).
    """
    name = os.fsdecode(path) if isinstance(path, bytes) else str(path)
    with open_regular_file(path, what=what, max_bytes=max_bytes, error=error) as fh:
        try:
            data = fh.read(max_bytes + 1)
        except OSError as exc:
            raise error(f"cannot read {what} ({exc.strerror or type(exc).__name__}): {name!r}") from None
    if len(data) > max_bytes:  # it grew while being read
        raise error(f"{what} too large (limit {max_bytes / 2**20:.0f} MiB): {name!r}")
    if not data:
        raise error(f"{what} is empty: {name!r}")
    return data
