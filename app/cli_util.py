"""Shared pieces of the click CLI: error handling, exit codes, safe text and JSON output.

Exit codes, one rule: 0 all good; 1 a model or an input could not be used (or a result could
not be written); 2 the command line is wrong (an option, a recipe name, a missing extra).
Every error is one ``error:`` line on stderr that names the file it is about.
"""

from __future__ import annotations

import fcntl
import functools
import io
import json
import math
import os
import stat
import sys
from typing import Any, List, Optional

import click

from lungedge.edge_runtime.errors import ConfigError, LungedgeError, MissingDependencyError, WriteError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_text(text: str) -> str:
    """``text`` with every non-printable character (newline, ESC of ANSI sequences, other
    control and format characters, undecodable bytes of file names) written as a Python
    escape, so a file name or label cannot forge a line or drive the terminal."""
    text = str(text)
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        elif ch in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[ch])
        else:
            o = ord(ch)
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}")
    return "".join(out)


def dumps_strict(obj: Any, **kwargs) -> str:
    """JSON that every parser accepts: non-finite numbers become null (never ``NaN``)."""
    return json.dumps(_finite(obj), allow_nan=False, **kwargs)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if hasattr(obj, "item") and hasattr(obj, "dtype"):  # numpy scalars
        return _finite(obj.item())
    return obj


def fail(message: str, code: int = EXIT_FAILED) -> None:
    click.echo(f"error: {escape_text(message)}", err=True)
    sys.exit(code)


def handle_errors(fn):
    """Turn library errors into one line on stderr and the exit code of the rule above."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ConfigError, MissingDependencyError) as exc:
            fail(str(exc), EXIT_USAGE)
        except LungedgeError as exc:
            fail(str(exc), EXIT_FAILED)
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper


class ResultSink:
    """Where a command's results go, with no partial output on a write failure.

    ``out`` given: lines are collected and written atomically at ``close()`` (temporary file
    and rename): a full disk leaves no file. Otherwise lines go to stdout one at a time; if
    stdout is a regular file (``> results.jsonl``) and a write fails, the file is cut back to
    what it held before this command, so it never ends in half a record.

    Raises (from ``line``/``close``):
        WriteError: the results could not be written.
    """

    def __init__(self, out: Optional[str] = None):
        self.out = out
        self._lines: List[str] = []
        self._fd: Optional[int] = None
        self._start = 0
        if out is None:
            try:
                fd = sys.stdout.fileno()
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode):
                    append = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND
                    self._fd, self._start = fd, st.st_size if append else os.lseek(fd, 0, os.SEEK_CUR)
            except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
                pass

    def line(self, text: str) -> None:
        if self.out is not None:
            self._lines.append(text)
            return
        try:
            click.echo(text)
            sys.stdout.flush()
        except OSError as exc:
            self._stdout_failed(exc)

    def close(self) -> None:
        if self.out is not None:
            from lungedge.edge_runtime.atomic_write import atomic_write_text

            atomic_write_text(self.out, "".join(ln + "\n" for ln in self._lines))
            return
        try:
            sys.stdout.flush()
        except OSError as exc:
            self._stdout_failed(exc)

    def _stdout_failed(self, exc: OSError) -> None:
        note = ""
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, self._start)
                note = "; the output file was cut back to what it held before, so it has no partial record"
            except OSError:
                pass
        try:  # what is still buffered must not fail again at exit
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            pass
        raise WriteError(f"cannot write the results to standard output ({exc.strerror or type(exc).__name__}){note}")


def parse_int_list(value: str, name: str) -> list:
    try:
        out = [int(x) for x in str(value).split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated integers, got {value!r}") from None
    if not out or any(x < 1 for x in out):
        raise ConfigError(f"{name} must be positive integers, got {value!r}")
    return out


class LazyGroup(click.Group):
    """A click group whose commands live in other modules, imported when used (click's documented
    lazy-loading pattern): ``lungedge classify`` on a device never imports the training commands."""

    def __init__(self, *args, lazy_commands: dict = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self.lazy_commands))

    def get_command(self, ctx, name):
        if name in self.lazy_commands and name not in self.commands:
            import importlib

            module, attr = self.lazy_commands[name].split(":")
            self.add_command(getattr(importlib.import_module(module), attr), name)
        return super().get_command(ctx, name)

