"""Many images through one classifier: decoding on a thread pool ahead of the interpreter.

Pillow and numpy release the GIL, so decoding and preprocessing on worker threads overlap the
interpreter's ``invoke`` on the calling thread; results keep the input order, and a bad image
becomes a ``Failure`` while the batch goes on.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

from .image_files import expand_inputs
from .errors import ImageError, OutputError
from .preprocess import ImageSource
from .results import Failure, Prediction

#: Decoding threads are at most this many: past it the interpreter, not decoding, is the bottleneck
#: for a MobileNet-class model.
MAX_DEFAULT_WORKERS = 4


def default_workers() -> int:
    """Decoding threads for folder runs: the usable cores, at most ``MAX_DEFAULT_WORKERS``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_WORKERS, cores))


def classify_many(prepare: Callable, infer: Callable, sources: Iterable[ImageSource], progress: bool = False,
                  heatmap: bool = False, workers: Optional[int] = None) -> Iterator[Union[Prediction, Failure]]:
    """Each source's result, in input order: ``infer(prepare(source, None), heatmap)``, or a
    ``Failure`` for an image that cannot be read or whose output cannot be used.

    Strings that name folders are expanded to the images inside them.

    Args:
        prepare, infer: the classifier's two steps (``Inference.prepare``, ``Inference.infer``).
        progress: a tqdm bar on stderr.
        workers: decoding threads, at most ``2 * workers`` images in flight; None:
            ``default_workers()``; 0: one image at a time on this thread.
    """
    items = _items(sources)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc="classify", unit="img", leave=False)
    workers = default_workers() if workers is None else workers
    try:
        for (src, _), prepared in zip(items, prepare_ahead(prepare, items, workers)):
            if bar is not None:
                bar.update()
            if isinstance(prepared, Failure):
                yield prepared
                continue
            try:
                yield infer(prepared, heatmap)
            except (ImageError, OutputError) as exc:
                yield Failure(str(src), str(exc))
    finally:
        if bar is not None:
            bar.close()


def _items(sources: Iterable[ImageSource]) -> list:
    """(source, problem or None) for each image: folders expanded, other sources as they are."""
    items: list = []
    for s in sources:
        if isinstance(s, (str, os.PathLike)):
            items.extend(expand_inputs([str(s)]))
        else:
            items.append((s, None))
    return items


def prepare_ahead(prepare: Callable, items: Sequence, workers: int) -> Iterator:
    """``prepare(source, None)`` for each (source, problem) item, in input order, as a
    ``Prepared`` or a ``Failure``; with ``workers`` > 0 on a thread pool, a bounded window ahead."""

    def one(src, problem):
        if problem:
            return Failure(str(src), problem)
        try:
            return prepare(src, None)
        except (ImageError, OutputError) as exc:
            return Failure(str(src), str(exc))

    if workers <= 0:
        for src, problem in items:
            yield one(src, problem)
        return
    from concurrent.futures import ThreadPoolExecutor

    window: deque = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lungedge-decode") as pool:
        try:
            for src, problem in items:
                window.append(pool.submit(one, src, problem))
                if len(window) >= 2 * workers:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:  # the consumer stopped early: drop what is queued, do not decode it
            for f in window:
                f.cancel()
