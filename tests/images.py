"""Small image files for tests, good and bad, written into a folder."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def gradient(w: int = 64, h: int = 48, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, w)[None, :] * np.ones((h, 1))
    return np.clip(x + rng.normal(0, 10, (h, w)), 0, 255).astype(np.uint8)


def huge_png_header(width: int = 20000, height: int = 20000) -> bytes:
    """A PNG that claims width x height pixels but holds almost nothing (decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def write_good_and_bad(folder: Path) -> dict:
    """Write one file of each kind; returns {kind: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    g = gradient()
    paths = {}

    def save(name, img, **kw):
        p = folder / name
        img.save(p, **kw)
        paths[name.split(".")[0]] = p

    save("gray.jpg", Image.fromarray(g), quality=95)
    save("rgb.png", Image.fromarray(np.stack([g, g // 2, 255 - g], -1)))
    save("rgba.png", Image.fromarray(np.stack([g, g, g, np.full_like(g, 128)], -1)))
    save("palette.png", Image.fromarray(g).convert("P"))
    save("cmyk.jpg", Image.fromarray(np.stack([g, g, g], -1)).convert("CMYK"))
    sixteen = (g.astype(np.uint16) * 16)  # 12-bit data in a 16-bit container, like many DICOM exports
    save("sixteen.png", Image.fromarray(sixteen))
    frames = [Image.fromarray(np.roll(g, k, axis=1)).convert("P") for k in range(3)]
    p = folder / "animated.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)
    paths["animated"] = p
    buf = io.BytesIO()
    Image.fromarray(g).save(buf, "JPEG", quality=95)
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    paths["truncated"] = folder / "truncated.jpg"
    (folder / "empty.jpg").write_bytes(b"")
    paths["empty"] = folder / "empty.jpg"
    (folder / "text.jpg").write_text("this is not an image\n")
    paths["text"] = folder / "text.jpg"
    (folder / "bomb.png").write_bytes(huge_png_header())
    paths["bomb"] = folder / "bomb.png"
    return paths


GOOD = ("gray", "rgb", "rgba", "palette", "cmyk", "sixteen")
BAD = ("animated", "truncated", "empty", "text", "bomb")


def make_images(root: Path, per_class: int = 24, size: int = 64, seed: int = 0, bad: bool = True) -> Path:
    """NORMAL (dark, Kermany IM- names) and PNEUMONIA (bright blob, person names) images, plus a corrupt file."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(("NORMAL", "PNEUMONIA")):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.normal(70 + 90 * c, 25, (size, size))
            if c:
                yy, xx = np.mgrid[:size, :size]
                img += 60 * np.exp(-((yy - rng.integers(16, 48)) ** 2 + (xx - rng.integers(16, 48)) ** 2) / 120.0)
            arr = np.clip(img, 0, 255).astype(np.uint8)
            fname = f"IM-{i // 2:04d}-{i:04d}.jpeg" if c == 0 else f"person{i // 2}_bacteria_{i}.jpeg"
            Image.fromarray(arr).save(d / fname)
    if bad:
        (root / "NORMAL" / "IM-9999-0001.jpeg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root
