"""Drawing a class activation map over the image a reader sees: numpy and Pillow only.

The map comes from the model file (``Classifier.classify(..., heatmap=True)``, the ``heatmap``
signature written by ``convert.heatmap_signature``): one value per location of the last convolutional
features (7x7 for MobileNetV2 at 224), in logit units, positive where the image argues for the
predicted class. Only the positive part is drawn, scaled to the image's own maximum, so a
location with no evidence keeps the radiograph's own grey; the scale's top (in logit units) is
returned so a report can say how strong the evidence was.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
from PIL import Image

from .preprocess import ImageSource, image_size, load_pixels
from .spec import Preprocessing

#: The longest side of a drawn image (the model sees 224; a reader wants more).
DISPLAY_MAX_SIDE = 512

# A perceptually ordered colour scale (dark blue, blue, cyan, yellow, red), evidence 0 to 1.
_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_COLOURS = np.array([[30, 20, 110], [40, 90, 230], [40, 210, 220], [250, 225, 40], [230, 30, 20]], np.float32)


def display_pixels(source: ImageSource, max_side: int = DISPLAY_MAX_SIDE, name: Optional[str] = None) -> np.ndarray:
    """The image as a reader sees it (aspect kept, longest side ``max_side`` at most), RGB
    uint8, decoded by the same preprocessing function as the model's input (DICOM included).

    Raises:
        ImageError: as ``load_pixels``.
    """
    w, h = image_size(source, name=name)
    scale = min(1.0, max_side / max(w, h, 1))
    size = Preprocessing(height=max(8, round(h * scale)), width=max(8, round(w * scale)), color_mode="rgb")
    if isinstance(source, (bytes, bytearray)) and name is not None:
        from .preprocess import load_image

        return load_image(source, size, name=name)[0]
    return load_pixels(source, size)


def upsample(cam: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """The map (h, w) resized to ``size`` (width, height) with bilinear interpolation, float32."""
    img = Image.fromarray(np.asarray(cam, np.float32), mode="F")
    return np.asarray(img.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)


def evidence(cam: np.ndarray, size: Tuple[int, int]) -> Tuple[np.ndarray, float]:
    """(evidence 0..1 at ``size`` (width, height), the map's top in logit units)."""
    up = np.maximum(upsample(cam, size), 0.0)
    top = float(up.max())
    return (up / top if top > 0 else up), top


def overlay(pixels: np.ndarray, cam: np.ndarray, alpha: float = 0.55) -> Image.Image:
    """The image ``pixels`` (H, W) or (H, W, 3) uint8 with the map drawn over it: RGB Pillow image.

    Each pixel is blended with the colour of its evidence, by ``alpha`` times the evidence, so
    where the model found none the image is unchanged.
    """
    base = np.asarray(pixels, np.uint8)
    if base.ndim == 3 and base.shape[2] == 1:
        base = base[:, :, 0]
    if base.ndim == 2:
        base = np.repeat(base[:, :, None], 3, axis=2)
    h, w = base.shape[:2]
    ev, _ = evidence(cam, (w, h))
    colour = np.stack([np.interp(ev, _STOPS, _COLOURS[:, c]) for c in range(3)], axis=-1)
    weight = (alpha * ev)[:, :, None]
    out = base.astype(np.float32) * (1.0 - weight) + colour * weight
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


def peak(cam: np.ndarray, size: Tuple[int, int]) -> Tuple[int, int]:
    """(x, y) of the map's maximum at ``size`` (width, height)."""
    up = upsample(cam, size)
    y, x = np.unravel_index(int(np.argmax(up)), up.shape)
    return int(x), int(y)
