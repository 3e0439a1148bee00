"""The first load of a model in a child process, so that a native crash becomes one error line.

LiteRT and tflite-runtime are C++ libraries that trust the file: a graph they cannot handle can
abort the whole process (SIGABRT, SIGSEGV) in ``allocate_tensors()`` or the first ``invoke()``,
with no Python exception to catch. ``trial_load`` forks, builds the interpreter, allocates and
invokes it once in the child, and reports how the child ended. A model the child could not load
(a crash, a hang or a Python exception) is refused without ever being loaded in the parent: a
damaged graph can read memory it does not own, so the same load can raise in one process and
crash the next. Only a model the child loaded and ran is loaded for real.

Cost (measured, docs/RESULTS.md "The device checks"): a fork plus one more interpreter build and invoke, about
16 ms for the int8 MobileNetV2 1.0/224 on this project's x86 test machine. ``Classifier(...,
guard=False)`` / ``--no-guard`` skips it for files already known to load.

On platforms without ``os.fork`` the guard is skipped (the load is then not isolated).
"""

from __future__ import annotations

import os
import select
import signal
import time
from typing import Optional, Tuple

from .errors import ModelError, first_line

#: Seconds the child may take to build, allocate and invoke once before it counts as a hang.
DEFAULT_TIMEOUT = 120.0
_CHILD_PYTHON_ERROR = 3


def guard_available() -> bool:
    return hasattr(os, "fork")


def trial_load(data: bytes, interpreter_class, threads: Optional[int], name: str,
               timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Build, allocate and invoke the model once in a child process.

    Args:
        data: the model's bytes.
        interpreter_class: the backend's ``Interpreter``.
        threads: interpreter threads (as the real load will use).
        name: the file, for messages.
        timeout: seconds before the child is killed and the model refused.

    Returns:
        True if the child built, allocated and invoked the model (or no guard is available).

    Raises:
        ModelError: the runtime crashed (a signal), hung, or raised while loading the model in
            the child; the message carries the runtime's last words.
    """
    if not guard_available():
        return True
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns
        _child(data, interpreter_class, threads, read_fd, write_fd)
    os.close(write_fd)
    try:
        status, output = _wait(pid, read_fd, timeout, name)
    finally:
        os.close(read_fd)
    return _verdict(status, output, name)


def _wait(pid: int, read_fd: int, timeout: float, name: str) -> Tuple[int, bytes]:
    """(the child's wait status, the last 8 kB it wrote on stderr); the child killed at ``timeout``.

    Raises:
        ModelError: the child did not finish in time.
    """
    output = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        left = deadline - time.monotonic()
        if left <= 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise ModelError(f"the interpreter did not finish loading the model within {timeout:.0f} s "
                             f"(stopped): {name!r}")
        ready, _, _ = select.select([read_fd], [], [], min(left, 0.05))
        if ready:
            _keep_tail(output, os.read(read_fd, 65536))
    while True:  # what the child wrote just before it ended
        ready, _, _ = select.select([read_fd], [], [], 0)
        chunk = os.read(read_fd, 65536) if ready else b""
        if not chunk:
            break
        _keep_tail(output, chunk)
    return status, bytes(output)


def _keep_tail(output: bytearray, chunk: bytes) -> None:
    """Append ``chunk``, keeping the last 8 kB (the runtime's last words are at the end)."""
    if chunk:
        output += chunk
        del output[:-8192]


def _verdict(status: int, output: bytes, name: str) -> bool:
    """True when the child ended well; else the ModelError that says how it ended."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            signame = signal.Signals(sig).name
        except ValueError:
            signame = f"signal {sig}"
        said = _last_line(output)
        raise ModelError(f"the interpreter crashed ({signame}) while loading the model"
                         f"{' (' + said + ')' if said else ''}: {name!r}")
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
    if code == 0:
        return True
    if code == _CHILD_PYTHON_ERROR:
        said = _last_line(output)
        raise ModelError(f"model cannot be loaded{' (' + said + ')' if said else ''}: {name!r}")
    raise ModelError(f"the interpreter ended with exit code {code} while loading the model: {name!r}")


def _child(data, interpreter_class, threads, read_fd, write_fd) -> None:  # pragma: no cover - runs in the child
    code = 1
    try:
        os.close(read_fd)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(write_fd, 2)  # the runtime's own last words, for the parent's message
        import faulthandler

        faulthandler.disable()  # a Python stack dump of the crash would only bury those words
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        try:
            it = interpreter_class(model_content=data, num_threads=threads)
            it.allocate_tensors()
            it.invoke()
            code = 0
        except Exception as exc:
            code = _CHILD_PYTHON_ERROR
            os.write(2, f"\n{type(exc).__name__}: {first_line(exc)}\n".encode("utf-8", "replace"))
    finally:
        os._exit(code)


def _last_line(output: bytes) -> str:
    lines = [ln.strip() for ln in output.decode("utf-8", "replace").splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("INFO:", "Fatal Python error", "Current thread", "  File", "Thread 0x",
                                                      "Extension modules", "Stack (most recent"))]
    text = lines[-1] if lines else ""
    return "".join(ch if ch.isprintable() else "?" for ch in text)[:160]
