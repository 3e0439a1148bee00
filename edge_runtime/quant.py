"""Quantised tensors, fed and read through the tensor's own scale and zero point (int8 and uint8 alike)."""

from __future__ import annotations

import numpy as np


def quantize(x: np.ndarray, scale: float, zero_point: int, dtype) -> np.ndarray:
    """Real values to the integer type ``dtype``: round(x / scale + zero_point), clipped to its range."""
    dtype = np.dtype(dtype)
    info = np.iinfo(dtype)
    return np.clip(np.rint(np.asarray(x) / scale + zero_point), info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """Integer values back to real ones, as float32: (q - zero_point) * scale."""
    return (np.asarray(q).astype(np.float32) - zero_point) * np.float32(scale)
