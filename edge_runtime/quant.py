"""Quantised tensors, fed and read through the tensor's own scale and zero point (int8 and uint8 alike)."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from .errors import ModelError


def quantize(x: np.ndarray, scale: float, zero_point: int, dtype) -> np.ndarray:
    """Real values to the integer type ``dtype``: round(x / scale + zero_point), clipped to its range."""
    dtype = np.dtype(dtype)
    info = np.iinfo(dtype)
    return np.clip(np.rint(np.asarray(x) / scale + zero_point), info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """Integer values back to real ones, as float32: (q - zero_point) * scale."""
    return (np.asarray(q).astype(np.float32) - zero_point) * np.float32(scale)


def tensor_quantization(details: dict) -> Optional[Tuple[float, int]]:
    """(scale, zero_point) of an int8/uint8/int16 tensor from its interpreter details, else None.

    Raises:
        ModelError: an integer tensor without a quantisation scale.
    """
    dtype = np.dtype(details["dtype"])
    if dtype not in (np.dtype(np.int8), np.dtype(np.uint8), np.dtype(np.int16)):
        return None
    qp = details.get("quantization_parameters") or {}
    scales, zeros = qp.get("scales", []), qp.get("zero_points", [])
    if len(scales):
        return float(scales[0]), int(zeros[0])
    scale, zero = details.get("quantization", (0.0, 0))
    if not scale:
        raise ModelError(f"tensor {details.get('name')!r} is {dtype.name} but has no quantisation scale")
    return float(scale), int(zero)


def dequantize_with(y: np.ndarray, q: Optional[Tuple[float, int]]) -> np.ndarray:
    """``y`` as float32: dequantised through ``q`` (scale, zero point), or as is when ``q`` is None."""
    return np.array(y, dtype=np.float32) if q is None else dequantize(y, *q)
