"""The one preprocessing path, shared by training, calibration, evaluation and the device.

``preprocess(source, spec)`` decodes an image (path, bytes, Pillow image or array), applies
its EXIF orientation, brings it to the model's colour mode, resizes it with the model's
method to the model's size and normalises it as ``(pixel - mean) / std``. Large JPEGs are
decoded with Pillow's draft mode (DCT scaling) first, which is several times faster and is
used in training too, so that the device sees exactly what the model was trained on.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError
from .spec import Preprocessing

#: Refuse images above this many pixels (a 2268x1959 X-ray is 4.4 MP; 100 MP is generous).
MAX_PIXELS = 100_000_000

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}

ImageSource = Union[str, "os.PathLike[str]", bytes, Image.Image, np.ndarray]


def preprocess(source: ImageSource, spec: Preprocessing) -> np.ndarray:
    """Turn one image into a float32 model input of shape (height, width, channels).

    Args:
        source: a file path, the encoded bytes of an image, a Pillow image, or a uint8
            array (H, W) or (H, W, C) with pixels 0..255. Arrays already at the model's
            size skip decoding and resizing. The source is never modified.
        spec: the model's preprocessing record.

    Returns:
        A new float32 array, normalised.

    Raises:
        ImageError: the source is missing, empty, not an image, truncated, multi-frame,
            too large, or has a layout that cannot be converted.
    """
    pixels = load_pixels(source, spec)
    return normalize(pixels, spec)


def load_pixels(source: ImageSource, spec: Preprocessing) -> np.ndarray:
    """Decode and resize to a uint8 array (height, width, channels); no normalisation."""
    if isinstance(source, np.ndarray):
        return _array_pixels(source, spec)
    if isinstance(source, Image.Image):
        return _image_pixels(source, spec, name="<image>")
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    with _open(source, name) as img:
        return _image_pixels(img, spec, name)


def normalize(pixels: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """(pixels - mean) / std as float32, in a new array."""
    mean = np.asarray(spec.mean, dtype=np.float32)
    inv_std = np.float32(1.0) / np.asarray(spec.std, dtype=np.float32)
    out = pixels.astype(np.float32)
    out -= mean
    out *= inv_std
    return out


def _open(source, name: str) -> Image.Image:
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageError("empty image data")
        fp = io.BytesIO(source)
    else:
        p = Path(source)
        if not p.exists():
            raise ImageError(f"file not found: {name!r}")
        if p.is_dir():
            raise ImageError(f"is a folder, not an image: {name!r}")
        try:
            if p.stat().st_size == 0:
                raise ImageError(f"empty file: {name!r}")
        except OSError as exc:
            raise ImageError(f"cannot read {name!r}: {exc.strerror or exc}") from None
        fp = p
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp)
    except UnidentifiedImageError:
        raise ImageError(f"not an image (unrecognised format): {name!r}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"image too large (decompression bomb guard): {name!r}") from None
    except OSError as exc:
        raise ImageError(f"cannot read {name!r}: {exc.strerror or exc}") from None
    return img


def _image_pixels(img: Image.Image, spec: Preprocessing, name: str) -> np.ndarray:
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise ImageError(f"image too large ({w}x{h} = {w * h / 1e6:.0f} MP, limit {MAX_PIXELS / 1e6:.0f} MP): {name!r}")
    if w < 1 or h < 1:
        raise ImageError(f"image has no pixels ({w}x{h}): {name!r}")
    frames = getattr(img, "n_frames", 1)
    if frames > 1:
        raise ImageError(f"multi-frame image ({frames} frames, e.g. an animated GIF); give one frame: {name!r}")
    try:
        orientation = img.getexif().get(0x0112, 1) if hasattr(img, "getexif") else 1
        if img.format == "JPEG":
            # DCT-domain downscale while decoding: never below the target size (x2 margin
            # for the rotation that EXIF may apply), so quality is kept and decode is cheaper.
            target = max(spec.width, spec.height)
            img.draft(img.mode if img.mode in ("L", "RGB") else None, (target, target))
        img.load()
    except OSError as exc:
        msg = str(exc) or type(exc).__name__
        raise ImageError(f"corrupt or truncated image ({msg}): {name!r}") from None
    except (ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError(f"cannot decode image ({exc}): {name!r}") from None
    if orientation != 1:
        img = ImageOps.exif_transpose(img)
    img = _to_mode(img, spec.color_mode, name)
    if img.size != spec.size:
        img = img.resize(spec.size, _RESAMPLE[spec.resize])
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


def _to_mode(img: Image.Image, color_mode: str, name: str) -> Image.Image:
    """Bring any Pillow mode to 8-bit L or RGB."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = _high_bit_depth_to_l(img)
    elif mode in ("P", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        # composite on black: transparent areas are background, like the film outside the body
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    if color_mode == "rgb":
        return img if img.mode == "RGB" else img.convert("RGB")
    return img if img.mode == "L" else img.convert("L")


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """16-bit/32-bit grayscale to 8-bit by the type's full range (window = whole range).

    Medical 16-bit images often use only 10-12 bits; a fixed full-range scale would make them
    nearly black, so the image's own min..max is used, which is what viewers show by default.
    """
    arr = np.asarray(img, dtype=np.float64)
    lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    if not np.isfinite(lo) or not np.isfinite(hi):
        arr = np.nan_to_num(arr)
        lo, hi = float(arr.min()), float(arr.max())
    scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) * (255.0 / (hi - lo))
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def _array_pixels(arr: np.ndarray, spec: Preprocessing) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr2 = arr[:, :, 0]
    else:
        arr2 = arr
    if arr2.ndim not in (2, 3) or (arr2.ndim == 3 and arr2.shape[2] not in (3, 4)):
        raise ImageError(f"array image must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {arr.shape}")
    if arr2.dtype != np.uint8:
        raise ImageError(f"array image must be uint8 pixels 0..255, got dtype {arr.dtype}")
    h, w = arr2.shape[:2]
    want_c = spec.channels
    if (h, w) == (spec.height, spec.width) and arr2.ndim == 3 and arr2.shape[2] == want_c == 3:
        return arr2.copy()
    if (h, w) == (spec.height, spec.width) and arr2.ndim == 2 and want_c == 1:
        return arr2[:, :, None].copy()
    return _image_pixels(Image.fromarray(arr2), spec, name="<array>")
