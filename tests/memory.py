"""A process's resident memory, sampled in a thread while a load runs (tests and benchmarks)."""

from __future__ import annotations

import threading
import time


class PeakRSS:
    """``with PeakRSS(pid) as m: ...``: ``m.start`` the RSS on entry, ``m.peak`` the largest seen."""

    def __init__(self, pid: int, every_s: float = 0.02):
        import psutil

        self.proc, self.every_s = psutil.Process(pid), every_s
        self.start = self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.every_s)

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
