"""A built-in, offline, procedurally generated two-class set of chest-radiograph-like images.

Every image has a body outline, two lung fields, ribs, a spine, a heart shadow, film grain and
a random exposure; the ``PNEUMONIA`` class adds one to three consolidation-like opacities of
varying size, position, shape and contrast inside the lung fields. Seeded: the same seed gives
the same files. This is for the demo and tests only; it says nothing about real radiographs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from lungedge.edge_runtime.progress import bar

CLASSES = ("NORMAL", "PNEUMONIA")


def synthetic_radiograph(rng: np.random.Generator, size: int = 224, opacities: int = 0) -> np.ndarray:
    """One grayscale uint8 image (size x size)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cx = 0.5 + rng.normal(0, 0.02)
    img = np.zeros((size, size), np.float32)
    # torso: a bright soft ellipse
    torso = ((xx - cx) / (0.42 + rng.normal(0, 0.02))) ** 2 + ((yy - 0.58) / 0.55) ** 2
    img += 0.55 * _soft(1.0 - torso, 0.08)
    # lung fields: two dark ellipses
    lungs = np.zeros_like(img)
    for side in (-1, 1):
        lx = cx + side * (0.17 + rng.normal(0, 0.01))
        lw, lh = 0.13 + rng.normal(0, 0.01), 0.30 + rng.normal(0, 0.02)
        e = ((xx - lx) / lw) ** 2 + ((yy - 0.47) / lh) ** 2
        lungs = np.maximum(lungs, _soft(1.0 - e, 0.1))
    img -= 0.38 * lungs
    # ribs: curved bright bands across the lungs
    phase = rng.uniform(0, 2 * np.pi)
    ribs = 0.5 + 0.5 * np.sin(2 * np.pi * (yy * 9.0 + 1.2 * (xx - cx) ** 2) + phase)
    img += 0.10 * (ribs ** 6) * lungs
    # spine and heart
    img += 0.25 * _soft(1.0 - np.abs(xx - cx) / 0.035, 0.3) * (yy > 0.12)
    heart = ((xx - (cx + 0.06)) / 0.12) ** 2 + ((yy - 0.62) / 0.13) ** 2
    img += 0.22 * _soft(1.0 - heart, 0.15)
    # consolidation-like opacities inside the lungs
    for _ in range(opacities):
        side = rng.choice((-1, 1))
        ox, oy = cx + side * rng.uniform(0.10, 0.24), rng.uniform(0.30, 0.68)
        r = rng.uniform(0.04, 0.11)
        stretch = rng.uniform(0.6, 1.6)
        blob = np.exp(-(((xx - ox) / (r * stretch)) ** 2 + ((yy - oy) / r) ** 2))
        texture = 0.75 + 0.25 * rng.random((size, size)).astype(np.float32)
        img += rng.uniform(0.28, 0.5) * blob * texture * lungs
    # exposure, blur-free film grain
    img = img * rng.uniform(0.85, 1.15) + rng.uniform(-0.05, 0.08)
    img += rng.normal(0, 0.025, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _soft(v: np.ndarray, width: float) -> np.ndarray:
    return np.clip(v / width, 0.0, 1.0)


def make_demo_dataset(out_dir: str, per_class: int = 150, size: int = 224, seed: int = 0) -> Path:
    """Write ``out_dir/{NORMAL,PNEUMONIA}/demo_<i>.png``; returns the folder.

    Existing files with the same names are overwritten (the content depends only on the seed).
    """
    root = Path(out_dir)
    rng = np.random.default_rng(seed)
    jobs = [(cls, i) for i in range(per_class) for cls in CLASSES]
    for cls, i in bar(jobs, desc="demo images"):
        n_op = 0 if cls == "NORMAL" else int(rng.integers(1, 4))
        arr = synthetic_radiograph(rng, size, n_op)
        d = root / cls
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(d / f"demo_{i:04d}.png", optimize=False)
    return root

