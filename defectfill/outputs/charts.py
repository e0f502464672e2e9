"""Small charts for the reports, drawn with PIL: a line chart (the training losses) and a histogram of groups
side by side (LFS scores, defect areas).

matplotlib is no dependency of defectfill, and these charts need only axes, ticks, bars, lines and a legend;
PIL draws them into a PNG the report embeds like its other pictures.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from PIL import Image, ImageDraw

# colour-blind safe (Okabe-Ito): one per series, in order
COLOURS = [(0, 114, 178), (230, 159, 0), (0, 158, 115), (204, 121, 167), (86, 180, 233), (213, 94, 0)]
WIDTH, HEIGHT = 520, 300
LEFT, RIGHT, TOP, BOTTOM = 58, 14, 28, 44


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if raw <= m * step:
            step *= m
            break
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step)) + 1)]


def _label(v: float) -> str:
    return f"{v:.3g}"


class _Axes:
    """A plot area with its data ranges, mapping data to pixels."""

    def __init__(self, title: str, xlabel: str, ylabel: str, x: tuple[float, float], y: tuple[float, float]):
        self.image = Image.new("RGB", (WIDTH, HEIGHT), (255, 255, 255))
        self.draw = ImageDraw.Draw(self.image)
        self.xt, self.yt = _ticks(*x), _ticks(*y)
        self.x0, self.x1 = self.xt[0], self.xt[-1]
        self.y0, self.y1 = self.yt[0], self.yt[-1]
        d = self.draw
        d.text((LEFT, 6), title, fill=(0, 0, 0))
        d.rectangle([LEFT, TOP, WIDTH - RIGHT, HEIGHT - BOTTOM], outline=(0, 0, 0))
        for t in self.xt:
            px = self.px(t)
            d.line([px, HEIGHT - BOTTOM, px, HEIGHT - BOTTOM + 4], fill=(0, 0, 0))
            d.text((px - 3 * len(_label(t)), HEIGHT - BOTTOM + 6), _label(t), fill=(0, 0, 0))
        for t in self.yt:
            py = self.py(t)
            d.line([LEFT - 4, py, LEFT, py], fill=(0, 0, 0))
            d.line([LEFT + 1, py, WIDTH - RIGHT - 1, py], fill=(232, 232, 232))
            d.text((LEFT - 8 - 6 * len(_label(t)), py - 6), _label(t), fill=(0, 0, 0))
        d.text(((LEFT + WIDTH - RIGHT) // 2 - 3 * len(xlabel), HEIGHT - 18), xlabel, fill=(0, 0, 0))
        d.text((4, TOP - 14), ylabel, fill=(0, 0, 0))

    def px(self, x: float) -> float:
        return LEFT + (x - self.x0) / (self.x1 - self.x0) * (WIDTH - RIGHT - LEFT)

    def py(self, y: float) -> float:
        return HEIGHT - BOTTOM - (y - self.y0) / (self.y1 - self.y0) * (HEIGHT - BOTTOM - TOP)

    def legend(self, names: Sequence[str]) -> None:
        x = WIDTH - RIGHT - 8 - 7 * max(len(n) for n in names) - 16
        for i, name in enumerate(names):
            y = TOP + 6 + 14 * i
            self.draw.rectangle([x, y + 2, x + 10, y + 10], fill=COLOURS[i % len(COLOURS)])
            self.draw.text((x + 14, y), name, fill=(0, 0, 0))


def line_chart(series: Mapping[str, Sequence[tuple[float, float]]], title: str, xlabel: str,
               ylabel: str) -> Image.Image:
    """One line per named series of (x, y) points, with a legend; series without points are left out."""
    series = {k: [(float(x), float(y)) for x, y in v if math.isfinite(y)] for k, v in series.items()}
    series = {k: v for k, v in series.items() if v}
    xs = [x for v in series.values() for x, _ in v] or [0.0, 1.0]
    ys = [y for v in series.values() for _, y in v] or [0.0, 1.0]
    ax = _Axes(title, xlabel, ylabel, (min(xs), max(xs)), (min(0.0, min(ys)), max(ys)))
    for i, points in enumerate(series.values()):
        colour = COLOURS[i % len(COLOURS)]
        pixels = [(ax.px(x), ax.py(y)) for x, y in points]
        if len(pixels) > 1:
            ax.draw.line(pixels, fill=colour, width=2)
        for px, py in pixels if len(pixels) <= 40 else []:
            ax.draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
    if series:
        ax.legend(list(series))
    return ax.image


def histogram(groups: Mapping[str, Sequence[float]], title: str, xlabel: str, bins: int = 12) -> Image.Image:
    """Counts of each named group's values in shared bins, the groups' bars side by side in each bin."""
    values = [float(v) for vs in groups.values() for v in vs if math.isfinite(v)]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5 * (abs(lo) or 1), hi + 0.5 * (abs(hi) or 1)
    width = (hi - lo) / bins
    counts = {name: [0] * bins for name in groups}
    for name, vs in groups.items():
        for v in vs:
            if math.isfinite(v):
                counts[name][min(bins - 1, int((float(v) - lo) / width))] += 1
    top = max((c for cs in counts.values() for c in cs), default=1)
    ax = _Axes(title, xlabel, "count", (lo, hi), (0, max(top, 1)))
    k = max(len(groups), 1)
    for g, cs in enumerate(counts.values()):
        colour = COLOURS[g % len(COLOURS)]
        for b, c in enumerate(cs):
            if not c:
                continue
            left = ax.px(lo + b * width) + 1
            right = ax.px(lo + (b + 1) * width) - 1
            bar = (right - left) / k
            ax.draw.rectangle([left + g * bar, ax.py(c), left + (g + 1) * bar - 1, ax.py(0)], fill=colour)
    if groups:
        ax.legend([f"{name} (n={len(vs)})" for name, vs in groups.items()])
    return ax.image
