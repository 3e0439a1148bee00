"""Which image files cannot be read: decode each with the one preprocessing path, in a thread pool
(Pillow releases the GIL while decoding), and report the bad ones in input order."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence, Tuple

from .errors import ImageError
from .preprocess import load_pixels
from .spec import Preprocessing


def unreadable(paths: Sequence[str], prep: Preprocessing, workers: int = 0, progress: bool = False,
               desc: str = "checking images") -> List[Tuple[str, str]]:
    """``(path, one-line error)`` for every file that ``load_pixels`` refuses, in input order."""

    def check(path: str) -> Optional[str]:
        try:
            load_pixels(path, prep)
        except ImageError as exc:
            return str(exc)
        return None

    workers = workers or max(1, min(8, (os.cpu_count() or 1)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(check, paths)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(paths), desc=desc, unit="img", leave=False)
        return [(p, e) for p, e in zip(paths, list(results)) if e is not None]
