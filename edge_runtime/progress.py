"""Progress of long work: a tqdm bar on stderr when the ``lungedge.progress`` logger is on.

Library code takes no ``progress`` flag: it wraps a long loop in ``bar(...)`` and whoever runs it
decides through Python's logging. The command line turns the logger on (INFO) on a terminal
(``lungedge.verbosity.configure``); a program that calls the library sees no bars unless it
enables ``lungedge.progress`` (or ``lungedge``) for INFO.
"""

from __future__ import annotations

import logging
from typing import Iterable, Optional

LOGGER = logging.getLogger("lungedge.progress")


def shown() -> bool:
    """True when long work shows progress bars."""
    return LOGGER.isEnabledFor(logging.INFO)


def bar(iterable: Optional[Iterable] = None, *, desc: str, unit: str = "img", total: Optional[int] = None,
        leave: bool = False):
    """``iterable`` wrapped in a tqdm bar (a disabled one, which costs nothing, unless ``shown()``)."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, unit=unit, total=total, leave=leave, disable=not shown())
