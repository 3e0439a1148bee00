"""Contrast normalisation of the model-size image: CLAHE in numpy (no OpenCV on the device).

Contrast-limited adaptive histogram equalisation (Zuiderveld 1994) as OpenCV's
``cv2.createCLAHE(clipLimit, (tiles, tiles)).apply`` computes it on 8-bit images: the image is cut
into ``tiles x tiles`` tiles; each tile's 256-bin histogram is clipped at
``max(1, int(clip_limit * tile_pixels / 256))`` with the excess spread evenly over the bins (the
remainder one count at a time at a regular step); each tile's cumulative histogram becomes a
lookup table; each pixel is mapped by bilinear interpolation between the tables of the four
nearest tile centres. Images whose sides do not divide into the tiles are padded by reflection
(OpenCV's BORDER_REFLECT_101) for the histograms. ``tests/test_contrast.py`` checks the result
against OpenCV.

It runs after the resize, on the model-size image, in ``edge_runtime.preprocess`` (the one
preprocessing function, used by training and the device alike); the model file's metadata says
whether it is applied (``Preprocessing.contrast``).
"""

from __future__ import annotations

import numpy as np

_BINS = 256


def clahe(gray: np.ndarray, clip_limit: float = 2.0, tiles: int = 8) -> np.ndarray:
    """CLAHE of a 2-D uint8 image, as a new uint8 array of the same shape.

    Args:
        gray: (H, W) uint8 pixels.
        clip_limit: OpenCV's ``clipLimit`` (a multiple of the mean bin count; 0 = no clipping).
        tiles: tiles per side (OpenCV's ``tileGridSize`` (tiles, tiles)).
    """
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"clahe needs a 2-D uint8 image, got {gray.dtype} {gray.shape}")
    h, w = gray.shape
    pad_h, pad_w = (-h) % tiles, (-w) % tiles
    src = np.pad(gray, ((0, pad_h), (0, pad_w)), mode="reflect") if pad_h or pad_w else gray
    th, tw = src.shape[0] // tiles, src.shape[1] // tiles
    area = th * tw
    # one histogram per tile: tile index * 256 + pixel value, counted at once
    blocks = src.reshape(tiles, th, tiles, tw).transpose(0, 2, 1, 3).reshape(tiles * tiles, area)
    offsets = (np.arange(tiles * tiles, dtype=np.int64) * _BINS)[:, None]
    hist = np.bincount((blocks + offsets).ravel(), minlength=tiles * tiles * _BINS).reshape(tiles * tiles, _BINS)
    if clip_limit > 0:
        limit = max(int(clip_limit * area / _BINS), 1)
        excess = np.maximum(hist - limit, 0).sum(axis=1)
        hist = np.minimum(hist, limit)
        batch = excess // _BINS
        hist += batch[:, None]
        residual = excess - batch * _BINS
        for t in np.flatnonzero(residual):  # the remainder: one count every `step` bins from 0
            r = int(residual[t])
            step = max(_BINS // r, 1)
            hist[t, np.arange(0, _BINS, step)[:r]] += 1
    lut = np.clip(np.rint(np.cumsum(hist, axis=1) * ((_BINS - 1) / area)), 0, 255).astype(np.float32)
    lut = lut.reshape(tiles, tiles, _BINS)
    y1, y2, ya = _axis(h, th, tiles)
    x1, x2, xa = _axis(w, tw, tiles)
    v = gray.astype(np.intp)
    yy1, yy2, ya = y1[:, None], y2[:, None], ya[:, None]
    top = lut[yy1, x1[None, :], v] * (1 - xa) + lut[yy1, x2[None, :], v] * xa
    bottom = lut[yy2, x1[None, :], v] * (1 - xa) + lut[yy2, x2[None, :], v] * xa
    out = top * (1 - ya) + bottom * ya
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _axis(n: int, tile: int, tiles: int):
    """For each of ``n`` pixel positions: the two nearest tile indices and the weight of the second."""
    pos = np.arange(n, dtype=np.float32) * np.float32(1.0 / tile) - np.float32(0.5)
    first = np.floor(pos).astype(np.intp)
    weight = (pos - first).astype(np.float32)
    return np.maximum(first, 0), np.minimum(first + 1, tiles - 1), weight


def apply_contrast(pixels: np.ndarray, method: str, clip_limit: float, tiles: int) -> np.ndarray:
    """``pixels`` (H, W, C) uint8 with ``method`` applied to each channel (a new array for CLAHE;
    ``pixels`` itself for "none"). Grayscale copied to three channels is equalised once."""
    if method == "none":
        return pixels
    if method != "clahe":  # spec.CONTRAST_METHODS; Preprocessing refuses other names
        raise ValueError(f"unknown contrast method {method!r}")
    c = pixels.shape[2]
    if c == 3 and np.array_equal(pixels[:, :, 0], pixels[:, :, 1]) and np.array_equal(pixels[:, :, 0], pixels[:, :, 2]):
        one = clahe(pixels[:, :, 0], clip_limit, tiles)
        return np.repeat(one[:, :, None], 3, axis=2)
    return np.stack([clahe(pixels[:, :, i], clip_limit, tiles) for i in range(c)], axis=2)
