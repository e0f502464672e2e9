"""A simple, stated feature space for what is painted inside a mask: colour statistics and edge energy.

Used where no trained perception network is available (offline tests, the `defectfill-mini` quality
benchmark): it asks whether a generated defect region has the colour, contrast and sharpness of real
defects, nothing more. Five numbers per region, all on a 0..1 scale:

    [mean R, mean G, mean B, std of luminance, mean gradient magnitude of luminance]

The gradient is a central difference over the whole image, averaged over the mask's pixels, so the
edge between a defect and its surround counts (a bright line has strong edges, a smooth fill none).
"""

from __future__ import annotations

import numpy as np

FEATURE_NAMES = ("mean_r", "mean_g", "mean_b", "luma_std", "edge_energy")


def mask_region_features(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 image and (H, W) bool mask -> the 5 features of the masked region (float64)."""
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
    if not mask.any():
        raise ValueError("empty mask")
    rgb = image.astype(np.float64) / 255.0  # (H, W, 3)
    luma = rgb @ np.array([0.299, 0.587, 0.114])  # (H, W)
    gy, gx = np.gradient(luma)
    grad = np.hypot(gx, gy)
    inside = mask.astype(bool)
    return np.array([*rgb[inside].mean(axis=0), luma[inside].std(), grad[inside].mean()])


def feature_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Euclidean distance between the mean feature vectors of two sets of regions, (N, 5) x (M, 5) -> float."""
    return float(np.linalg.norm(np.asarray(features_a).mean(axis=0) - np.asarray(features_b).mean(axis=0)))
