"""Importing TensorFlow and Keras: once, quietly, or with a one-line error saying how to install them.

TensorFlow prints start-up lines from C++ (oneDNN, CPU features, absl) straight to file
descriptor 2 when it is imported; they hide the progress and results users came for. They
reach the terminal only when the ``lungedge`` logger is enabled for DEBUG (``lungedge --verbose``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys

from lungedge.edge_runtime.errors import MissingDependencyError, ModelError, first_line


def verbose() -> bool:
    """True when TensorFlow's own output should be shown: ``lungedge`` logs DEBUG (``lungedge --verbose``)."""
    return logging.getLogger("lungedge").isEnabledFor(logging.DEBUG)


def keras_verbosity() -> int:
    """Keras's own ``verbose`` for fit and predict: 0 when ``lungedge`` does not log INFO (quiet),
    1 (progress bars) when progress is shown (``edge_runtime.progress``), else 2 (one line per epoch)."""
    from lungedge.edge_runtime.progress import shown

    if not logging.getLogger("lungedge").isEnabledFor(logging.INFO):
        return 0
    return 1 if shown() else 2


def import_tf():
    """``(tensorflow, keras)``, imported quietly unless verbose.

    Raises:
        MissingDependencyError: TensorFlow is not installed.
    """
    if not verbose():
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        if "tensorflow" in sys.modules or verbose():
            import keras
            import tensorflow as tf
        else:
            with quiet():
                import keras
                import tensorflow as tf
    except ImportError as exc:
        raise MissingDependencyError(f"this needs TensorFlow (pip install 'lungedge[train]'): {exc}") from None
    if not verbose():
        tf.get_logger().setLevel("ERROR")
    return tf, keras


@contextlib.contextmanager
def quiet():
    """Silence Python and C++ output (file descriptors 1 and 2) and warnings inside the block."""
    import tempfile
    import warnings

    sys.stdout.flush()
    sys.stderr.flush()
    saved = []
    sink = None
    try:
        sink = tempfile.TemporaryFile()
        for fd in (1, 2):
            saved.append((fd, os.dup(fd)))
            os.dup2(sink.fileno(), fd)
    except (OSError, ValueError):  # no real descriptors (embedded interpreters, pytest capture): Python-level only
        pass
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
        if sink is not None:
            sink.close()


def load_keras_model(path):
    """A Keras model from a ``.keras`` / ``.h5`` file, uncompiled.

    Raises:
        ModelError: no such file, or a file Keras cannot load (Keras raises many types).
    """
    from pathlib import Path

    _, keras = import_tf()
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"Keras model not found: {str(p)!r}")
    from .model import register_custom_objects

    register_custom_objects()  # model.keras files saved compiled by earlier versions with label smoothing name its loss
    try:
        return keras.models.load_model(str(p), compile=False)
    except Exception as exc:
        raise ModelError(f"cannot load Keras model {str(p)!r}: {first_line(exc)}") from None

