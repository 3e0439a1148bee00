"""Which class is the disease class: a recipe's ``positive_label`` matched to the data's class names.

The threshold is chosen by ``edge_runtime.operating_point`` and applied by ``edge_runtime.decision``.
"""

from __future__ import annotations

from typing import Optional, Sequence

from lungedge.edge_runtime.image_files import label_key as key
from lungedge.edge_runtime.errors import ConfigError


def resolve_label(name: Optional[str], labels: Sequence[str]) -> Optional[str]:
    """Match a recipe's class name to the dataset's folder names: exact, then case-insensitive,
    then by prefix ignoring spaces and punctuation ("malignant" -> "Malignant cases").

    Raises:
        ConfigError: no or several matches.
    """
    if name is None:
        return None
    if name in labels:
        return name

    exact = [x for x in labels if key(x) == key(name)]
    if len(exact) == 1:
        return exact[0]
    prefix = [x for x in labels if key(x).startswith(key(name))]
    if len(prefix) == 1:
        return prefix[0]
    raise ConfigError(f"positive_label {name!r} matches {'none' if not prefix else 'several'} of the classes {list(labels)!r}")
