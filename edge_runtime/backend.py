"""Which TFLite interpreter runs the model: LiteRT first, then tflite-runtime. Never TensorFlow."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import Callable, Optional

from .errors import ConfigError, MissingDependencyError, first_line

BACKENDS = ("litert", "tflite-runtime")
_MODULES = {
    "litert": ("ai_edge_litert.interpreter", "ai-edge-litert", "lungedge[edge]"),
    "tflite-runtime": ("tflite_runtime.interpreter", "tflite-runtime", "lungedge[tflite]"),
}


@dataclass(frozen=True)
class Backend:
    """An importable interpreter implementation."""

    name: str
    version: str
    interpreter_class: Callable
    module: object

    def describe(self) -> str:
        return f"{self.name} {self.version}"


def available_backends() -> list:
    """Names of the backends that import here, in preference order."""
    names = []
    for name in BACKENDS:
        try:
            load_backend(name)
        except MissingDependencyError:
            continue
        names.append(name)
    return names


def load_backend(name: Optional[str] = "auto") -> Backend:
    """Import the named backend (``auto``: LiteRT, then tflite-runtime).

    Raises:
        ConfigError: unknown name.
        MissingDependencyError: the backend is not installed or does not import.
    """
    name = name or "auto"
    if name == "auto":
        errors = []
        for candidate in BACKENDS:
            try:
                return load_backend(candidate)
            except MissingDependencyError as exc:
                errors.append(str(exc))
        raise MissingDependencyError(
            "no TFLite interpreter is installed: pip install 'lungedge[edge]' (LiteRT) "
            "or 'lungedge[tflite]' (tflite-runtime, Python <= 3.11, numpy < 2)"
        )
    if name not in _MODULES:
        raise ConfigError(f"unknown backend {name!r}; choose from auto, {', '.join(BACKENDS)}")
    module_name, dist, extra = _MODULES[name]
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or numpy ABI errors raised as other types
        raise MissingDependencyError(
            f"backend {name} is not usable ({type(exc).__name__}: {first_line(exc)}); "
            f"pip install '{extra}'"
        ) from None
    return Backend(name=name, version=_version(module_name, dist), interpreter_class=module.Interpreter, module=module)


def _version(module_name: str, dist: str) -> str:
    """The package's ``__version__`` (both backends have one); importlib.metadata only as a
    fallback, because importing it costs ~20 ms of a cold ``lungedge classify``."""
    import sys

    top = sys.modules.get(module_name.split(".")[0])
    ver = getattr(top, "__version__", None)
    if isinstance(ver, str) and ver:
        return ver
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return "unknown"


#: What the TFLite runtime prints on stderr at every load, with no option to turn it off from
#: Python: start-up chatter, not a message for the user. Anything else it prints is kept.
_RUNTIME_CHATTER = (b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",)
_stderr_lock = threading.Lock()


@contextlib.contextmanager
def quiet_runtime():
    """Run an interpreter's construction and allocation without its INFO line on stderr.

    The C++ runtime writes straight to file descriptor 2, so the descriptor is pointed at a
    temporary file for the duration and everything but the known chatter is written back to the
    real stderr afterwards (real warnings and errors are never hidden). Falls back to doing
    nothing when descriptor 2 cannot be redirected.
    """
    with _stderr_lock:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
            capture = tempfile.TemporaryFile()
            os.dup2(capture.fileno(), 2)
        except (OSError, ValueError):
            yield
            return
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [ln for ln in capture.read().splitlines(keepends=True)
                    if ln.strip() and ln.strip() not in _RUNTIME_CHATTER]
            capture.close()
            if kept:
                os.write(2, b"".join(kept))


def runtime_message(exc: BaseException) -> str:
    """What a runtime's exception says, on one line: its specific lines first (the C++ side often
    prints a generic one last), without the "See instructions" and "Node number" boilerplate."""
    text = str(exc).strip() or type(exc).__name__
    lines = [ln.strip() for ln in text.replace("; See instructions", "\nSee instructions").splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("See instructions", "Node number"))] or lines
    return "; ".join(lines[:2])[:300]
