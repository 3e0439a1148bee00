"""ImageNet weights for MobileNetV2: a local file first, then Keras's own download, never a silent fallback.

Keras looks up ``weights="imagenet"`` as ``$KERAS_HOME/models/<file>`` with a file name that
depends on alpha and input size. Here the file is looked up in this order and passed to Keras
as a path:

1. ``$LUNGEDGE_IMAGENET_WEIGHTS`` (a file, or a folder holding it);
2. ``$KERAS_HOME/models/`` (default ``~/.keras/models/``);
3. ``../shared/models/mobilenet_v2_imagenet/`` beside the repository (this project's offline copy);
4. Keras's standard download (``keras.utils.get_file``, with its progress bar), which caches the
   file in ``$KERAS_HOME/models/`` so that the next run finds it at step 2.

When all four fail (no network), ``WeightsUnavailable`` says so in one line naming the three
ways to provide the file; callers that may train from scratch (the demo) catch it.

The 224-pixel no-top file loads into a no-top MobileNetV2 of any input size (the layer shapes
do not depend on it), so it is used for other sizes too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

from lungedge.edge_runtime.errors import ConfigError, first_line

ENV_VAR = "LUNGEDGE_IMAGENET_WEIGHTS"
#: Where Keras downloads its MobileNetV2 weights from (keras.src.applications.mobilenet_v2).
KERAS_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"


class WeightsUnavailable(ConfigError):
    """The ImageNet weights are neither on disk nor downloadable."""
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
        WeightsUnavailable: no file found; the message says where it was looked for and how to provide it.
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
    raise WeightsUnavailable(
        f"MobileNetV2 ImageNet weights (alpha {float(alpha)}) not found: no {names[-1]} in {where}; "
        + how_to_provide(names[-1]))


def how_to_provide(file_name: str) -> str:
    """The three ways to give lungedge the weights file, in one sentence."""
    return (f"put {file_name} in $KERAS_HOME/models/ (default ~/.keras/models/), "
            f"or set {ENV_VAR}=/path/to/{file_name}, or pass --weights /path/to/{file_name}")


def download_imagenet_weights(alpha: float = 1.0, image_size: int = 224) -> Path:
    """Fetch the no-top weights the standard Keras way (cached in ``$KERAS_HOME/models/``).

    Only the 224 file is fetched: it serves every input size (see the module docstring).

    Raises:
        WeightsUnavailable: the download failed (no network, proxy, disk); the message names
            the reason and the three ways to provide the file.
    """
    from .tfimport import import_tf

    _, keras = import_tf()
    name = imagenet_file_name(alpha, 224)
    try:
        path = keras.utils.get_file(name, KERAS_WEIGHTS_URL + name, cache_subdir="models")
    except Exception as exc:  # urllib, socket, OS errors: all mean "not available now"
        reason = first_line(exc, 500).split(" -- ")[-1][:200]
        raise WeightsUnavailable(
            f"MobileNetV2 ImageNet weights not found locally and the download failed ({reason}); "
            + how_to_provide(name)) from None
    return Path(path)


def obtain_imagenet_weights(alpha: float = 1.0, image_size: int = 224, download: bool = True) -> Path:
    """A local weights file (``find_imagenet_weights``), else Keras's download when ``download``.

    Raises:
        WeightsUnavailable: neither worked.
    """
    try:
        return find_imagenet_weights(alpha, image_size)
    except WeightsUnavailable:
        if not download:
            raise
    return download_imagenet_weights(alpha, image_size)


def resolve_weights(weights: str, alpha: float = 1.0, image_size: int = 224) -> Optional[str]:
    """Turn a recipe's ``weights`` ("imagenet", "none" or a path) into what Keras takes.

    Returns:
        A file path, or None for random initialisation.

    Raises:
        WeightsUnavailable: ImageNet weights neither found nor downloadable.
        ConfigError: the given path does not exist.
    """
    if weights in ("none", "None", "", None):
        return None
    if weights == "imagenet":
        return str(obtain_imagenet_weights(alpha, image_size))
    p = Path(weights).expanduser()
    if not p.is_file():
        raise ConfigError(f"weights file not found: {weights!r} (use 'imagenet', 'none' or an existing .h5/.weights.h5 file)")
    return str(p)
