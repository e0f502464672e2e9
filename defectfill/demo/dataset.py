"""A small procedurally drawn dataset in the MVTec AD layout.

Used by the tests (one fixture instead of ad-hoc folders), by the demo, and by
`defectfill make-demo-data DIR`. Objects are drawn on a plain background so the
foreground can be told apart; textures fill the whole frame. Defects are drawn
with varied shape, colour and blur, and their masks are exact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# category -> (kind, defect types)
DEMO_CATEGORIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "disc": ("object", ("scratch", "spot")),
    "weave": ("texture", ("crack",)),
}


def _good_image(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    if kind == "texture":
        y, x = np.mgrid[0:size, 0:size] / size
        phase = rng.uniform(0, 2 * np.pi, 2)
        base = 0.5 + 0.2 * np.sin(2 * np.pi * 8 * x + phase[0]) * np.sin(2 * np.pi * 8 * y + phase[1])
        rgb = np.stack([base * 0.9, base * 0.75, base * 0.5], -1) + rng.normal(0, 0.02, (size, size, 3))
        return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))
    image = Image.new("RGB", (size, size), (20, 20, 24))
    draw = ImageDraw.Draw(image)
    r = size * rng.uniform(0.34, 0.4)
    cx, cy = size / 2 + rng.uniform(-2, 2), size / 2 + rng.uniform(-2, 2)
    shade = int(rng.integers(150, 190))
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(shade, shade - 10, shade - 30))
    draw.ellipse([cx - r / 3, cy - r / 3, cx + r / 3, cy + r / 3], fill=(shade - 40, shade - 50, shade - 60))
    arr = np.asarray(image, dtype=np.float32) + rng.normal(0, 3, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _draw_defect(image: Image.Image, defect: str, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    size = image.size[0]
    mask = Image.new("L", image.size, 0)
    layer = image.copy()
    draw, mdraw = ImageDraw.Draw(layer), ImageDraw.Draw(mask)
    c = size / 2
    if defect == "scratch":
        angle = rng.uniform(0, np.pi)
        length = size * rng.uniform(0.2, 0.4)
        x0, y0 = c + rng.uniform(-size * 0.12, size * 0.12), c + rng.uniform(-size * 0.12, size * 0.12)
        pts = [(x0 - np.cos(angle) * length / 2, y0 - np.sin(angle) * length / 2),
               (x0 + np.cos(angle) * length / 2, y0 + np.sin(angle) * length / 2)]
        width = max(1, int(size * rng.uniform(0.02, 0.04)))
        tone = int(rng.integers(220, 256))
        draw.line(pts, fill=(tone, tone, tone), width=width)
        mdraw.line(pts, fill=255, width=width)
    elif defect == "spot":
        r = size * rng.uniform(0.05, 0.1)
        x0, y0 = c + rng.uniform(-size * 0.15, size * 0.15), c + rng.uniform(-size * 0.15, size * 0.15)
        box = [x0 - r, y0 - r * rng.uniform(0.6, 1.0), x0 + r, y0 + r * rng.uniform(0.6, 1.0)]
        tone = tuple(int(v) for v in rng.integers(40, 90, 3))
        draw.ellipse(box, fill=tone)
        mdraw.ellipse(box, fill=255)
    else:  # crack: a jagged polyline
        n = int(rng.integers(4, 7))
        x, y = rng.uniform(size * 0.2, size * 0.8, 2)
        pts = [(x, y)]
        for _ in range(n):
            x = float(np.clip(x + rng.uniform(-size * 0.12, size * 0.12), 2, size - 3))
            y = float(np.clip(y + rng.uniform(-size * 0.12, size * 0.12), 2, size - 3))
            pts.append((x, y))
        width = max(1, int(size * rng.uniform(0.02, 0.035)))
        draw.line(pts, fill=(30, 20, 10), width=width, joint="curve")
        mdraw.line(pts, fill=255, width=width, joint="curve")
    blurred = layer.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    mask_arr = np.asarray(mask) >= 128
    out = np.where(mask_arr[..., None], np.asarray(blurred), np.asarray(image))
    return Image.fromarray(out.astype(np.uint8)), mask_arr


def make_demo_dataset(
    root: str | Path,
    size: int = 64,
    n_good: int = 6,
    n_defect: int = 6,
    n_good_test: int = 3,
    categories: dict[str, tuple[str, tuple[str, ...]]] | None = None,
    seed: int = 0,
) -> Path:
    """Write an MVTec-AD-layout dataset to `root` and return it."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for category, (kind, defects) in (categories or DEMO_CATEGORIES).items():
        base = root / category
        for i in range(n_good):
            _save(_good_image(kind, size, rng), base / "train" / "good" / f"{i:03d}.png")
        for i in range(n_good_test):
            _save(_good_image(kind, size, rng), base / "test" / "good" / f"{i:03d}.png")
        for defect in defects:
            for i in range(n_defect):
                image, mask = _draw_defect(_good_image(kind, size, rng), defect, rng)
                _save(image, base / "test" / defect / f"{i:03d}.png")
                _save(Image.fromarray(mask.astype(np.uint8) * 255), base / "ground_truth" / defect / f"{i:03d}_mask.png")
    return root


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
