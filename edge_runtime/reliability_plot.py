"""The reliability diagram of a recalibration, drawn with Pillow (the device has no matplotlib).

One chart: predicted disease probability (x) against the observed disease fraction (y) per bin,
before (grey) and after (blue) recalibration, each point's area by its image count, the diagonal
of perfect calibration, and both expected calibration errors in the legend.
"""

from __future__ import annotations

from typing import Sequence, Tuple

from .atomic_write import atomic_write_bytes

SIZE = (640, 560)
_MARGIN = (70, 52, 30, 70)  # left, top, right, bottom
_BEFORE, _AFTER, _AXIS, _GRID = (150, 150, 150), (31, 119, 180), (40, 40, 40), (225, 225, 225)


def draw_reliability(bins_before: Sequence[Tuple[float, float, int]], bins_after: Sequence[Tuple[float, float, int]],
                     path: str, *, title: str, label_before: str, label_after: str) -> None:
    """Write the diagram as a PNG at ``path`` (atomically).

    Raises:
        WriteError: the file could not be written (from ``atomic_write_bytes``).
    """
    import io

    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", SIZE, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, top, right, bottom = _MARGIN
    x0, y0, x1, y1 = left, top, SIZE[0] - right, SIZE[1] - bottom

    def at(px: float, py: float) -> Tuple[float, float]:
        return x0 + px * (x1 - x0), y1 - py * (y1 - y0)

    for i in range(11):
        v = i / 10
        gx, _ = at(v, 0)
        _, gy = at(0, v)
        d.line([(gx, y0), (gx, y1)], fill=_GRID)
        d.line([(x0, gy), (x1, gy)], fill=_GRID)
        if i % 2 == 0:
            d.text((gx - 8, y1 + 6), f"{v:.1f}", fill=_AXIS, font=font)
            d.text((x0 - 30, gy - 6), f"{v:.1f}", fill=_AXIS, font=font)
    d.rectangle([x0, y0, x1, y1], outline=_AXIS)
    d.line([at(0, 0), at(1, 1)], fill=_AXIS, width=1)
    d.text((x0, 8), title, fill=_AXIS, font=font)
    d.text(((x0 + x1) / 2 - 90, y1 + 28), "predicted disease probability (bin mean)", fill=_AXIS, font=font)
    d.text((8, y0 - 24), "observed disease fraction", fill=_AXIS, font=font)
    total = max(1, sum(c for _, _, c in bins_before))
    for rows, colour in ((bins_before, _BEFORE), (bins_after, _AFTER)):
        points = [at(p, f) for p, f, _ in rows]
        if len(points) > 1:
            d.line(points, fill=colour, width=2)
        for (p, f, c), (px, py) in zip(rows, points):
            r = 3 + 14 * (c / total) ** 0.5
            d.ellipse([px - r, py - r, px + r, py + r], outline=colour, width=2)
    for i, (text, colour) in enumerate(((label_before, _BEFORE), (label_after, _AFTER))):
        ly = y0 + 10 + 16 * i
        d.line([(x0 + 10, ly + 6), (x0 + 30, ly + 6)], fill=colour, width=3)
        d.text((x0 + 36, ly), text, fill=_AXIS, font=font)
    d.text((x0 + 10, y0 + 44), "circle area: images in the bin", fill=_AXIS, font=font)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(str(path), buf.getvalue())
