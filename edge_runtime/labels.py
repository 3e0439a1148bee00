"""Class names a caller gives a classifier: a list, or a labels file (one name per line)."""

from __future__ import annotations

import os
from typing import List

from .errors import InputError
from .files import read_regular_file
from .spec import ModelSpec

#: Refuse a labels file larger than this (ImageNet's 1,001 labels are 22 kB).
MAX_LABELS_BYTES = 4 * 2**20


def read_labels(labels) -> List[str]:
    """The names of ``labels``: a path to a UTF-8 text file (blank lines skipped) or a sequence;
    repeated names made distinct.

    Raises:
        InputError: the file is missing, too large, not UTF-8 or empty.
    """
    if isinstance(labels, (str, os.PathLike)):
        name = os.fsdecode(labels)
        data = read_regular_file(labels, what="labels file", max_bytes=MAX_LABELS_BYTES, error=InputError)
        try:
            names = [line.strip() for line in data.decode("utf-8").splitlines()]
        except UnicodeDecodeError:
            raise InputError(f"labels file is not UTF-8 text: {name!r}") from None
        names = [n for n in names if n]
        if not names:
            raise InputError(f"labels file is empty: {name!r}")
        return disambiguate(names)
    return disambiguate([str(x) for x in labels])


def disambiguate(names: List[str]) -> List[str]:
    """Third-party label files repeat names (ImageNet has two 'crane'); keep each distinct."""
    seen: dict = {}
    out = []
    for i, n in enumerate(names):
        out.append(n if n not in seen else f"{n} [{i}]")
        seen[n] = True
    return out


def replace_labels(spec: ModelSpec, labels: List[str]) -> ModelSpec:
    """``spec`` with other class names; a threshold or positive class they do not name is dropped."""
    threshold, positive = spec.threshold, spec.positive_label
    if threshold and threshold.label not in labels:
        threshold = None
    if positive and positive not in labels:
        positive = None
    return spec.replace(labels=tuple(labels), threshold=threshold, positive_label=positive)
