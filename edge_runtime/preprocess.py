"""The one preprocessing path, shared by training, calibration, evaluation and the device.

``preprocess(source, spec)`` decodes an image (path, bytes, Pillow image or array; DICOM through
``edge_runtime.dicom`` when pydicom is installed), applies
its EXIF orientation, brings it to the model's colour mode, resizes it with the model's
method to the model's size, equalises its contrast when the model says so (CLAHE,
``edge_runtime.contrast``) and normalises it as ``(pixel - mean) / std``. Large JPEGs are
decoded with Pillow's draft mode (DCT scaling) first, which is several times faster and is
used in training too, so that the device sees exactly what the model was trained on.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from typing import Optional, Tuple, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .contrast import apply_contrast
from .dicom import DicomInfo, is_dicom, read_dicom
from .errors import ImageError, first_line
from .files import open_regular_file
from .spec import Preprocessing

#: Image formats that are decoded, recognised from the file's content (never its name). Every
#: other format Pillow knows is refused before its decoder runs: PostScript/EPS would start
#: Ghostscript, and rarely used decoders are where fuzzed files find bugs. GIF, TIFF and WebP
#: are read when they hold one frame; animations and multi-page files are refused. DICOM is
#: recognised by its Part 10 marker and read by pydicom (``edge_runtime.dicom``), not Pillow.
ALLOWED_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "GIF", "PPM", "DICOM")
_PILLOW_FORMATS = tuple(f for f in ALLOWED_FORMATS if f != "DICOM")

#: Refuse images above this many pixels, as declared in the header (a 2268x1959 X-ray is 4.4 MP).
MAX_PIXELS = 100_000_000

#: Refuse images whose decoded size, width x height x bytes per pixel (after JPEG draft
#: scaling), exceeds this, before decoding. The steps after decoding hold at most about three
#: such copies (an RGBA image composited on black), so peak memory stays below ~0.5 GB.
MAX_DECODED_BYTES = 128 * 2**20

#: Refuse image files larger than this before reading them.
MAX_FILE_BYTES = 256 * 2**20

_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "LA": 2, "La": 2, "PA": 2, "I;16": 2, "I;16L": 2, "I;16B": 2,
                    "I;16N": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3, "RGBA": 4, "RGBa": 4, "RGBX": 4,
                    "CMYK": 4, "I": 4, "F": 4}

# First bytes of formats users meet that are not read here, to say what a refused file is.
_KNOWN_OTHER = ((b"%!PS", "PostScript"), (b"\xc5\xd0\xd3\xc6", "EPS"), (b"%PDF", "PDF"),
                (b"\x00\x00\x00\x0cjP", "JPEG 2000"), (b"\xff\x4f\xff\x51", "JPEG 2000"),
                (b"\x00\x00\x01\x00", "ICO"), (b"8BPS", "Photoshop"), (b"PK\x03\x04", "zip archive"),
                (b"\x1f\x8b", "gzip archive"), (b"7z\xbc\xaf", "7-Zip archive"))

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
    """Decode, resize and (when the model says so) equalise to a uint8 array (height, width, channels); no normalisation.

    Raises:
        ImageError: any problem with this one image (every exception of the decoders included),
            as one line naming it.
    """
    return load_image(source, spec)[0]


def load_image(source: ImageSource, spec: Preprocessing, name: Optional[str] = None) -> Tuple[np.ndarray, Optional[DicomInfo]]:
    """``load_pixels`` that also returns what a DICOM file says about itself (None for other images).

    Args:
        source, spec: as ``load_pixels``.
        name: how to name bytes in messages (an upload's name); paths are named by themselves.

    Raises:
        ImageError: as ``load_pixels``.
    """
    if isinstance(source, np.ndarray):
        pixels, info = _array_pixels(source, spec), None
    elif isinstance(source, Image.Image):
        pixels, info = _guarded(lambda: _image_pixels(source, spec, "<image>"), "<image>"), None
    else:
        if name is None:
            name = "<bytes>" if isinstance(source, (bytes, bytearray)) else os.fsdecode(source)
        pixels, info = _guarded(lambda: _decode(source, spec, name), name)
    return apply_contrast(pixels, spec.contrast, spec.clahe_clip_limit, spec.clahe_tiles), info


def _source_file(stack: contextlib.ExitStack, source, name: str):
    """A readable binary file over ``source`` (bytes or a path; a regular file within the size
    limit), and whether it is DICOM (from its content)."""
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageError("empty image data")
        if len(source) > MAX_FILE_BYTES:
            raise ImageError(f"image data too large ({len(source) / 2**20:.0f} MiB, limit "
                             f"{MAX_FILE_BYTES / 2**20:.0f} MiB): {name!r}")
        fp = io.BytesIO(source)
    else:
        fp = stack.enter_context(open_regular_file(source, what="image", max_bytes=MAX_FILE_BYTES, error=ImageError))
    head = fp.read(DICM_HEAD)
    fp.seek(0)
    return fp, is_dicom(head)


def _decode(source, spec: Preprocessing, name: str) -> Tuple[np.ndarray, Optional[DicomInfo]]:
    with contextlib.ExitStack() as stack:
        fp, dicom = _source_file(stack, source, name)
        if dicom:
            arr, info = read_dicom(fp, name, MAX_PIXELS, MAX_DECODED_BYTES)
            return _image_pixels(Image.fromarray(arr), spec, name), info
        img = stack.enter_context(_open(fp, name))
        return _image_pixels(img, spec, name), None


DICM_HEAD = 132  # bytes read to recognise DICOM (its marker is at 128..131)


def image_size(source: ImageSource, name: Optional[str] = None) -> Tuple[int, int]:
    """(width, height) of an image as it is shown (EXIF orientation applied), from its header.

    Raises:
        ImageError: as ``load_pixels``.
    """
    if isinstance(source, np.ndarray):
        return int(source.shape[1]), int(source.shape[0])
    if isinstance(source, Image.Image):
        return source.size
    if name is None:
        name = "<bytes>" if isinstance(source, (bytes, bytearray)) else os.fsdecode(source)
    return _guarded(lambda: _size(source, name), name)


def _size(source, name: str) -> Tuple[int, int]:
    with contextlib.ExitStack() as stack:
        fp, dicom = _source_file(stack, source, name)
        if dicom:
            from .dicom import read_dicom_size

            return read_dicom_size(fp, name)
        img = stack.enter_context(_open(fp, name))
        w, h = img.size
        orientation = img.getexif().get(0x0112, 1) if hasattr(img, "getexif") and img.format != "PNG" else 1
        return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _guarded(fn, name: str) -> np.ndarray:
    """Run one image's decoding; whatever a decoder raises becomes that image's ImageError."""
    try:
        return fn()
    except ImageError:
        raise
    except MemoryError:
        raise ImageError(f"not enough memory to decode the image: {name!r}") from None
    except RecursionError:
        raise ImageError(f"cannot decode image (nesting too deep): {name!r}") from None
    except Exception as exc:  # Pillow's decoders raise OSError, ValueError, SyntaxError, TypeError, IndexError...
        raise ImageError(f"cannot decode image ({type(exc).__name__}: {first_line(exc, 120)}): {name!r}") from None


def normalize(pixels: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """(pixels - mean) / std as float32, in a new array."""
    mean = np.asarray(spec.mean, dtype=np.float32)
    inv_std = np.float32(1.0) / np.asarray(spec.std, dtype=np.float32)
    out = pixels.astype(np.float32)
    out -= mean
    out *= inv_std
    return out


def _open(fp, name: str) -> Image.Image:
    head = fp.read(16)
    fp.seek(0)
    try:
        with warnings.catch_warnings():
            # the pixel limit is ours (MAX_PIXELS, checked below), not Pillow's 89.5 MP warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp, formats=_PILLOW_FORMATS)
    except UnidentifiedImageError:
        kind = next((label for magic, label in _KNOWN_OTHER if head.startswith(magic)), None)
        what = f"a {kind} file, " if kind else ""
        raise ImageError(f"not an image ({what}not one of the formats read: {', '.join(ALLOWED_FORMATS)}): {name!r}") from None
    except Image.DecompressionBombError:
        raise ImageError(f"image too large (over twice Pillow's pixel limit, our limit is {MAX_PIXELS / 1e6:.0f} MP): {name!r}") from None
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
    if img.format == "JPEG":
        # DCT-domain downscale while decoding: never below the target size (x2 margin
        # for the rotation that EXIF may apply), so quality is kept and decode is cheaper.
        target = max(spec.width, spec.height)
        img.draft(img.mode if img.mode in ("L", "RGB") else None, (target, target))
    _check_budget(img, name)  # before getexif(), which decodes a PNG to find its EXIF chunk
    orientation = img.getexif().get(0x0112, 1) if hasattr(img, "getexif") else 1
    try:
        img.load()
    except OSError as exc:
        msg = str(exc) or type(exc).__name__
        raise ImageError(f"corrupt or truncated image ({msg[:120]}): {name!r}") from None
    if orientation != 1:
        img = ImageOps.exif_transpose(img)
    img = _to_mode(img, spec.color_mode, name)
    if img.size != spec.size:
        # a grayscale file for an RGB model is resized as one channel and copied to three after
        # (_rgb): the same pixels as converting first (Pillow resizes channels independently), a third of the work
        img = img.resize(spec.size, _RESAMPLE[spec.resize])
    img = _rgb(img, spec)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


def _check_budget(img: Image.Image, name: str) -> None:
    """Refuse before decoding when width x height x bytes per pixel exceeds MAX_DECODED_BYTES."""
    w, h = img.size
    bpp = _BYTES_PER_PIXEL.get(img.mode, 8)
    need = w * h * bpp
    if need > MAX_DECODED_BYTES:
        raise ImageError(f"image too large to decode ({w}x{h} {img.mode}, {need / 2**20:.0f} MiB decoded, limit "
                         f"{MAX_DECODED_BYTES / 2**20:.0f} MiB): {name!r}")


def _to_mode(img: Image.Image, color_mode: str, name: str) -> Image.Image:
    """Bring any Pillow mode to 8-bit L or RGB (an RGB model's grayscale image stays L: see _rgb)."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = _high_bit_depth_to_l(img)
    elif mode in ("P", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        # composite on black: transparent areas are background, like the film outside the body
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    if color_mode == "rgb":  # L stays L here: _rgb() after the resize
        return img if img.mode in ("RGB", "L") else img.convert("RGB")
    return img if img.mode == "L" else img.convert("L")


def _rgb(img: Image.Image, spec: Preprocessing) -> Image.Image:
    return img.convert("RGB") if spec.color_mode == "rgb" and img.mode == "L" else img


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """16-bit/32-bit grayscale to 8-bit by the type's full range (window = whole range).

    Medical 16-bit images often use only 10-12 bits; a fixed full-range scale would make them
    nearly black, so the image's own min..max is used, which is what viewers show by default.
    Computed in blocks of rows, so memory stays near the image's own size.
    """
    arr = np.asarray(img)
    finite = True
    if arr.dtype.kind == "f":
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        finite = np.isfinite(lo) and np.isfinite(hi)
        if not finite:
            lo = min(float(np.nan_to_num(arr[i:i + _ROWS].astype(np.float64)).min()) for i in range(0, arr.shape[0], _ROWS))
            hi = max(float(np.nan_to_num(arr[i:i + _ROWS].astype(np.float64)).max()) for i in range(0, arr.shape[0], _ROWS))
    else:
        lo, hi = float(arr.min()), float(arr.max())
    out = np.zeros(arr.shape, np.uint8)
    if hi > lo:
        scale = 255.0 / (hi - lo)
        for i in range(0, arr.shape[0], _ROWS):
            block = arr[i:i + _ROWS].astype(np.float64)
            if not finite:
                block = np.nan_to_num(block)
            out[i:i + _ROWS] = np.clip(np.rint((block - lo) * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(out)


_ROWS = 256  # rows per block in _high_bit_depth_to_l


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
