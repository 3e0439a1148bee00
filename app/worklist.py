"""The images received by the DICOM listener, newest first, for the web page's worklist.

Thread-safe: the listener adds from its worker thread, the page reads from the event loop.
Only the last ``keep`` entries are held (with their thumbnails); each has a sequence number so
the page asks for what arrived after the last one it shows.
"""

from __future__ import annotations

import collections
import threading
from typing import List, Tuple

from lungedge.results_report import Entry

#: entries the worklist holds (older ones leave the page; the audit log keeps every one)
KEEP = 200


class Worklist:
    def __init__(self, keep: int = KEEP):
        self._items: "collections.deque[Tuple[int, Entry]]" = collections.deque(maxlen=keep)
        self._lock = threading.Lock()
        self.seq = 0

    def add(self, entry: Entry) -> int:
        with self._lock:
            self.seq += 1
            self._items.append((self.seq, entry))
            return self.seq

    def after(self, seq: int) -> List[Tuple[int, Entry]]:
        """The entries numbered above ``seq``, newest first (all of them when ``seq`` is ahead,
        as after a restart)."""
        with self._lock:
            start = 0 if seq > self.seq else seq
            return [item for item in reversed(self._items) if item[0] > start]
