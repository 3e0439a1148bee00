"""Offline ImageNet weights for MobileNetV2: find the file, never download, never fall back silently.

Keras looks up ``weights="imagenet"`` as ``$KERAS_HOME/models/<file>`` with a file name that
depends on alpha and input size, and tries to download anything it does not find. Here the
file is looked up in this order and passed to Keras as a path:

1. ``$LUNGEDGE_IMAGENET_WEIGHTS`` (a file, or a folder holding it);
2. ``$KERAS_HOME/models/`` (default ``~/.keras/models/``);
3. ``../shared/models/mobilenet_v2_imagenet/`` beside the repository (this project's offline copy).

The 224-pixel no-top file loads into a no-top MobileNetV2 of any input size (the layer shapes
do not depend on it), so it is used for other sizes too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

from edge_runtime.errors import ConfigError

ENV_VAR = "LUNGEDGE_IMAGENET_WEIGHTS"
_REPO = Path(__file__).resolve().parents[1]


def imagenet_file_name(alpha: float = 1.0, rows: int = 224) -> str:
    """Keras's own file name for the no-top ImageNet weights."""
    return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{rows}_no_top.h5"


def candidate_dirs() -> List[Path]:
    """Folders searched for the weights file, in order."""
    dirs: List[Path] = []
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env)
        dirs.append(p.parent if p.suffix == ".h5" else p)
    keras_home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
    dirs.append(keras_home / "models")
    dirs.append(_REPO.parent / "shared" / "models" / "mobilenet_v2_imagenet")
    return dirs


def find_imagenet_weights(alpha: float = 1.0, image_size: int = 224) -> Path:
    """Path of a no-top ImageNet weights file usable for this alpha at this input size.

    Prefers the file made for ``image_size`` (96/128/160/192/224), else the 224 file.

    Raises:
        ConfigError: no file found; the message says where it was looked for and how to provide it.
    """
    env = os.environ.get(ENV_VAR)
    names = [imagenet_file_name(alpha, image_size)] if image_size != 224 else []
    names.append(imagenet_file_name(alpha, 224))
    if env and Path(env).is_file():
        return Path(env)
    for d in candidate_dirs():
        for name in names:
            p = d / name
            if p.is_file():
                return p
    where = ", ".join(str(d) for d in candidate_dirs())
    raise ConfigError(
        f"MobileNetV2 ImageNet weights (alpha {float(alpha)}) not found: no {names[-1]} in {where}; "
        f"put the file in $KERAS_HOME/models/, or set {ENV_VAR}=/path/to/{names[-1]}, "
        "or pass --weights PATH (or --weights none to train from scratch)"
    )


def resolve_weights(weights: str, alpha: float = 1.0, image_size: int = 224) -> Optional[str]:
    """Turn a recipe's ``weights`` ("imagenet", "none" or a path) into what Keras takes.

    Returns:
        A file path, or None for random initialisation.

    Raises:
        ConfigError: ImageNet weights not available, or the given path does not exist.
    """
    if weights in ("none", "None", "", None):
        return None
    if weights == "imagenet":
        return str(find_imagenet_weights(alpha, image_size))
    p = Path(weights).expanduser()
    if not p.is_file():
        raise ConfigError(f"weights file not found: {weights!r} (use 'imagenet', 'none' or an existing .h5/.weights.h5 file)")
    return str(p)
