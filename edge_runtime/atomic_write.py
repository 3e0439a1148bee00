"""Writing a file whole or not at all: through a temporary file, fsync and a rename."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import WriteError


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: never half a file.

    Raises:
        WriteError: the folder cannot be made or the file cannot be written (a full disk, a
            read-only card); the temporary file is removed and ``path`` is left as it was.
    """
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except OSError as exc:
        raise WriteError(f"cannot write {str(p)!r} ({exc.strerror or type(exc).__name__}); "
                         f"nothing was written") from None
    finally:
        try:
            if tmp.exists():
                tmp.unlink()
        except OSError:
            pass


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
