"""Target masks for generation: the object's foreground, shape masks placed on it, user masks.

Defects belong on the object, never on the background, so every generated mask
lies inside an estimate of the foreground: the pixels that differ from the
image's border colour. A texture (no uniform border) counts as all foreground.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from defectfill.core.errors import DefectFillError
from defectfill.data.images import is_image_file, load_mask

log = logging.getLogger(__name__)

SHAPES = ("ellipse", "square", "star", "line", "blob")
DEFAULT_MASK_SCALE = (0.005, 0.05)

# Border pixels whose spread (mean per-channel std, 0..255) exceeds this are not a plain background.
_TEXTURE_BORDER_STD = 25.0
# A pixel belongs to the object when its colour is this far (max channel difference) from the background.
_MIN_FOREGROUND_DIFF = 30.0


# --------------------------------------------------------------------------- foreground


def _erode(mask: np.ndarray, pixels: int) -> np.ndarray:
    if pixels <= 0:
        return mask
    im = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
    for _ in range(pixels):
        im = im.filter(ImageFilter.MinFilter(3))
    return np.asarray(im) >= 128


def _dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    return ~_erode(~mask, pixels)


def estimate_foreground(image: Image.Image, margin: int = 1) -> np.ndarray:
    """Bool HxW: True on the object.

    The background colour is the median of the one-pixel border; a pixel is foreground
    when it differs from it by more than max(30, 3x the border's spread). Specks are
    removed by an opening, and `margin` pixels are eroded so a mask inside the result
    keeps off the object's outline. A texture (busy border) or an estimate that covers
    almost nothing or almost everything returns all True: no background to avoid.
    """
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    h, w = arr.shape[:2]
    everything = np.ones((h, w), dtype=bool)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])  # (2H+2W, 3)
    spread = float(border.std(axis=0).mean())
    if spread > _TEXTURE_BORDER_STD:
        return everything
    background = np.median(border, axis=0)
    diff = np.abs(arr - background).max(axis=2)  # (H, W)
    fg = diff > max(_MIN_FOREGROUND_DIFF, 3.0 * spread)
    fg = _dilate(_erode(fg, 1), 1)  # opening: drop isolated noisy pixels
    fraction = fg.mean()
    if fraction < 0.01 or fraction > 0.98:
        return everything
    eroded = _erode(fg, margin)
    return eroded if eroded.any() else fg


# --------------------------------------------------------------------------- shapes


def parse_mask_scale(text: str) -> tuple[float, float]:
    """'MIN,MAX' area fractions -> (min, max) with 0 < min <= max < 1."""
    try:
        lo, hi = (float(v) for v in str(text).split(","))
    except ValueError:
        raise DefectFillError(f"--mask-scale {text!r}: expected two area fractions MIN,MAX such as 0.005,0.05.") from None
    check_mask_scale((lo, hi))
    return lo, hi


def check_mask_scale(scale: tuple[float, float]) -> None:
    lo, hi = scale
    if not (0 < lo <= hi < 1):
        raise DefectFillError(f"--mask-scale {lo},{hi}: need 0 < MIN <= MAX < 1 (fractions of the image area).")


def parse_shapes(text: str) -> list[str]:
    shapes = [s.strip() for s in str(text).split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if not shapes or unknown:
        raise DefectFillError(f"--shapes {text!r}: choose from {','.join(SHAPES)} (comma-separated).")
    return shapes


def _polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _unit_polygon(shape: str, rng: np.random.Generator, target_area: float) -> np.ndarray:
    """(K, 2) outline centred at 0, any scale; the caller scales it to the target area."""
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    if shape == "ellipse":
        aspect = rng.uniform(0.4, 1.0)
        return np.stack([np.cos(t), aspect * np.sin(t)], 1)
    if shape == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)
    if shape == "star":
        points = int(rng.integers(4, 7))
        inner = rng.uniform(0.4, 0.6)
        angles = np.arange(2 * points) * np.pi / points
        radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)
    if shape == "line":
        # a scratch: long thin bar; at least ~2 px wide so it rasterises as a solid stroke
        aspect = min(rng.uniform(6.0, 14.0), max(1.0, target_area / 4.0))
        return np.array([[-aspect, -1], [aspect, -1], [aspect, 1], [-aspect, 1]], dtype=np.float64)
    if shape == "blob":
        # radius perturbed by a few low-frequency harmonics: smooth, irregular, star-convex
        radius = np.ones_like(t)
        for k in (2, 3, 4):
            radius += rng.uniform(0.0, 0.25 / k * 2) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
        radius = np.clip(radius, 0.3, None)
        return np.stack([radius * np.cos(t), radius * np.sin(t)], 1)
    raise DefectFillError(f"unknown mask shape {shape!r}; choose from {', '.join(SHAPES)}.")


def _rasterise(points: np.ndarray, h: int, w: int) -> np.ndarray:
    im = Image.new("L", (w, h), 0)
    ImageDraw.Draw(im).polygon([tuple(p) for p in points.tolist()], fill=255)
    return np.asarray(im) >= 128


def shape_mask(
    shape: str,
    foreground: np.ndarray,
    scale: tuple[float, float] = DEFAULT_MASK_SCALE,
    rng: np.random.Generator | None = None,
    tries: int = 200,
) -> np.ndarray:
    """A bool HxW mask of `shape`, its area a fraction in [scale] of the image, inside `foreground`.

    Random size, rotation and position; a draw that leaves the foreground or the image,
    or whose rasterised area falls outside the range, is redrawn. Raises when no
    placement fits (the object is too small for the requested area range).
    """
    check_mask_scale(scale)
    rng = rng if rng is not None else np.random.default_rng()
    h, w = foreground.shape
    total = h * w
    lo, hi = math.ceil(scale[0] * total), math.floor(scale[1] * total)
    if lo < 1 or hi < lo:
        raise DefectFillError(
            f"--mask-scale {scale[0]},{scale[1]} asks for {scale[0] * total:.1f}..{scale[1] * total:.1f} pixels on a "
            f"{w}x{h} image: no whole number of pixels fits. Widen the range."
        )
    ys, xs = np.nonzero(foreground)
    if len(ys) < lo:
        raise DefectFillError(
            f"the object's foreground ({len(ys)} px) is smaller than the smallest mask asked for ({lo} px); "
            "lower --mask-scale."
        )
    for _ in range(tries):
        target = rng.uniform(lo, hi + 1)
        outline = _unit_polygon(shape, rng, target)
        outline = outline * math.sqrt(target / _polygon_area(outline))
        angle = rng.uniform(0, 2 * np.pi)
        rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        i = int(rng.integers(len(ys)))
        centre = np.array([xs[i] + 0.5, ys[i] + 0.5])
        points = outline @ rot.T + centre
        if points[:, 0].min() < 0 or points[:, 1].min() < 0 or points[:, 0].max() > w or points[:, 1].max() > h:
            continue
        mask = _rasterise(points, h, w)
        area = int(mask.sum())
        if lo <= area <= hi and not (mask & ~foreground).any():
            return mask
    raise DefectFillError(
        f"could not place a {shape} of {scale[0]:.3%}..{scale[1]:.3%} of the image inside the object's foreground "
        f"({foreground.mean():.1%} of the image) in {tries} tries; lower --mask-scale or use other --shapes."
    )


# --------------------------------------------------------------------------- user masks


def fit_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a bool mask to `size` (W, H) with nearest neighbour, keeping it binary."""
    if (mask.shape[1], mask.shape[0]) == tuple(size):
        return mask
    im = Image.fromarray(mask.astype(np.uint8) * 255, mode="L").resize(size, Image.Resampling.NEAREST)
    return np.asarray(im) >= 128


def list_user_masks(folder: str | Path) -> list[Path]:
    """The non-empty masks of a folder, sorted by name; empty ones are skipped with a warning."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DefectFillError(f"--masks {folder}: folder not found. Pass a folder of mask images, 'held-out' or 'shapes'.")
    files = sorted(p for p in folder.iterdir() if is_image_file(p))
    if not files:
        raise DefectFillError(f"--masks {folder}: no mask images in this folder (png, jpg, bmp, tif).")
    kept = []
    for path in files:
        if load_mask(path).any():
            kept.append(path)
        else:
            log.warning("%s: mask is empty (no white pixels); skipping it.", path)
    if not kept:
        raise DefectFillError(
            f"--masks {folder}: every mask is empty. Defect pixels must be white (or non-zero) on black."
        )
    return kept
