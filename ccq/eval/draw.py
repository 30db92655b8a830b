"""Bar and line charts drawn with PIL: the synthetic ChartQA images and the report plots share them.

PIL only (no matplotlib), so that drawing needs nothing beyond what transformers' image processors need.
"""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

PALETTE = [(66, 114, 196), (237, 125, 49), (112, 173, 71), (165, 105, 189), (91, 155, 213), (255, 192, 0)]
_MARGIN_LEFT, _MARGIN_RIGHT, _MARGIN_TOP, _MARGIN_BOTTOM = 56, 16, 30, 40


def _nice_max(v: float) -> float:
    """Round the axis top up to 1, 2, 2.5, 5 or 10 times a power of ten."""
    if v <= 0:
        return 1.0
    p = 10.0 ** math.floor(math.log10(v))
    return next(m * p for m in (1, 2, 2.5, 5, 10) if m * p >= v * (1 - 1e-12))


def _fmt(v: float) -> str:
    return f"{v:g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def _frame(title: str, size: tuple[int, int], y_max: float, y_label: str):
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    w, h = size
    x0, y0, x1, y1 = _MARGIN_LEFT, _MARGIN_TOP, w - _MARGIN_RIGHT, h - _MARGIN_BOTTOM
    d.text((x0, 8), title, fill="black", font=font)
    d.line([(x0, y0), (x0, y1), (x1, y1)], fill="black")
    for i in range(5):
        v = y_max * i / 4
        y = y1 - (y1 - y0) * i / 4
        d.line([(x0 - 4, y), (x0, y)], fill="black")
        d.text((4, y - 6), _fmt(v), fill="black", font=font)
    if y_label:
        d.text((4, y0 - 22), y_label, fill="gray", font=font)
    return img, d, font, (x0, y0, x1, y1)


def _legend(d, font, names, x, y):
    for i, name in enumerate(names):
        d.rectangle([x, y + 12 * i + 2, x + 8, y + 12 * i + 10], fill=PALETTE[i % len(PALETTE)])
        d.text((x + 12, y + 12 * i), name, fill="black", font=font)


def bar_chart(title: str, categories: list[str], series: dict[str, list[float]],
              size: tuple[int, int] = (448, 336), y_label: str = "", value_labels: bool = False,
              y_max: float | None = None) -> Image.Image:
    """Grouped bars: one group per category, one bar per series (values >= 0; y_max fixes the axis top)."""
    y_max = y_max or _nice_max(max((v for vals in series.values() for v in vals), default=1.0))
    img, d, font, (x0, y0, x1, y1) = _frame(title, size, y_max, y_label)
    n_cat, n_ser = max(len(categories), 1), max(len(series), 1)
    group_w = (x1 - x0) / n_cat
    bar_w = group_w * 0.8 / n_ser
    for c, cat in enumerate(categories):
        gx = x0 + c * group_w + group_w * 0.1
        for s, vals in enumerate(series.values()):
            v = vals[c]
            top = y1 - (y1 - y0) * (v / y_max)
            d.rectangle([gx + s * bar_w, top, gx + (s + 1) * bar_w - 2, y1], fill=PALETTE[s % len(PALETTE)])
            if value_labels:
                d.text((gx + s * bar_w, top - 11), _fmt(v), fill="black", font=font)
        d.text((gx, y1 + 6), cat, fill="black", font=font)
    if len(series) > 1:
        _legend(d, font, list(series), x1 - 110, 2)
    return img


def line_chart(title: str, x_labels: list[str], series: dict[str, list[float]],
               size: tuple[int, int] = (448, 336), y_label: str = "", value_labels: bool = False,
               label_every: int = 1) -> Image.Image:
    """One polyline per series over evenly spaced x positions (values must be >= 0)."""
    y_max = _nice_max(max((v for vals in series.values() for v in vals), default=1.0))
    img, d, font, (x0, y0, x1, y1) = _frame(title, size, y_max, y_label)
    n = max(len(x_labels), 1)
    step = (x1 - x0 - 20) / max(n - 1, 1)
    xs = [x0 + 10 + i * step for i in range(n)]
    for i, lab in enumerate(x_labels):
        if i % label_every == 0 or i == n - 1:
            d.text((xs[i] - 8, y1 + 6), lab, fill="black", font=font)
    for s, (name, vals) in enumerate(series.items()):
        pts = [(xs[i], y1 - (y1 - y0) * (v / y_max)) for i, v in enumerate(vals)]
        color = PALETTE[s % len(PALETTE)]
        if len(pts) > 1:
            d.line(pts, fill=color, width=2)
        for i, (px, py) in enumerate(pts):
            d.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color)
            if value_labels:
                d.text((px - 6, py - 13), _fmt(vals[i]), fill="black", font=font)
    if len(series) > 1:
        _legend(d, font, list(series), x1 - 110, 2)
    return img
