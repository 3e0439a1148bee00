"""How much the command line says: one configuration of Python's logging for every command.

Library modules log to ``logging.getLogger(__name__)`` (all under ``lungedge``) and show progress
through ``lungedge.edge_runtime.progress``; ``configure`` decides, once, what reaches stderr.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional

import click

from lungedge.edge_runtime import progress as _progress

QUIET, NORMAL, VERBOSE = 0, 1, 2
_LEVELS = {QUIET: logging.WARNING, NORMAL: logging.INFO, VERBOSE: logging.DEBUG}


class _EchoHandler(logging.Handler):
    """Each record's message alone on stderr, as the stream is when it is written (click's runner swaps it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(self.format(record), err=True)
        except Exception:  # as logging's own handlers: a failed write never stops the work
            self.handleError(record)


def configure(verbosity: int = NORMAL, progress: Optional[bool] = None) -> None:
    """Messages, progress bars and TensorFlow's own output for a command.

    Args:
        verbosity: ``QUIET`` (warnings and errors), ``NORMAL`` (also progress messages) or
            ``VERBOSE`` (also TensorFlow's start-up lines and Keras's own output).
        progress: progress bars; None: when not quiet and stderr is a terminal.
    """
    root = logging.getLogger("lungedge")
    for h in [h for h in root.handlers if isinstance(h, _EchoHandler)]:
        root.removeHandler(h)
    root.addHandler(_EchoHandler())
    root.setLevel(_LEVELS[verbosity])
    root.propagate = False  # the command owns stderr: one line per message
    show_progress(verbosity > QUIET and sys.stderr.isatty() if progress is None else progress)
    # TensorFlow reads this once, when it is first imported (lungedge.train.tfimport)
    if verbosity >= VERBOSE:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    else:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def show_progress(on: bool) -> None:
    """Progress bars on or off (a command's ``--progress/--no-progress``)."""
    _progress.LOGGER.setLevel(logging.INFO if on else logging.WARNING)
