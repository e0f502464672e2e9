"""Training-time augmentation and the object branch's random box masks.

All randomness comes from an explicit `torch.Generator`, so a training step is a
pure function of (seed, step) and a resumed run draws exactly what an
uninterrupted one would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high] inclusive."""
    return int(torch.randint(low, high + 1, (), generator=generator).item())


def resize_crop_keep_defect(
    image: torch.Tensor,  # (3, H, W) in [-1, 1]
    mask: torch.Tensor,  # (1, H, W) in {0, 1}
    generator: torch.Generator,
    max_scale: float = 1.125,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Enlarge by a random factor in [1, max_scale] and crop back to (H, W).

    The same transform goes to image and mask, and the crop window is chosen so
    the whole defect stays inside it (where the defect fits at all).
    """
    _, h, w = image.shape
    scale = _uniform(generator, 1.0, max_scale)
    nh, nw = max(h, round(h * scale)), max(w, round(w * scale))
    if (nh, nw) == (h, w):
        return image, mask
    big = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
    # every enlarged pixel the defect reaches through the image's own bilinear resize (any weight, not >= 0.5:
    # that threshold cut a 1 px diagonal line into pieces while the enlarged image still showed the scratch)
    big_mask = F.interpolate(mask[None].float(), size=(nh, nw), mode="bilinear", align_corners=False)[0] > 1e-6
    ys, xs = torch.nonzero(big_mask[0], as_tuple=True)
    if len(ys):
        y_lo, y_hi = max(0, int(ys.max()) - h + 1), min(nh - h, int(ys.min()))
        x_lo, x_hi = max(0, int(xs.max()) - w + 1), min(nw - w, int(xs.min()))
    else:
        y_lo, y_hi, x_lo, x_hi = 0, nh - h, 0, nw - w
    if y_lo > y_hi:  # defect taller than the crop: centre it
        y_lo = y_hi = min(max(0, (int(ys.min()) + int(ys.max()) - h) // 2), nh - h)
    if x_lo > x_hi:
        x_lo = x_hi = min(max(0, (int(xs.min()) + int(xs.max()) - w) // 2), nw - w)
    y0, x0 = _randint(generator, y_lo, y_hi), _randint(generator, x_lo, x_hi)
    return big[:, y0 : y0 + h, x0 : x0 + w], big_mask[:, y0 : y0 + h, x0 : x0 + w].to(mask.dtype)


def random_box_mask(
    height: int,
    width: int,
    generator: torch.Generator,
    num_boxes: int = 30,
    min_side: float = 0.03,
    max_side: float = 0.25,
) -> torch.Tensor:
    """(1, H, W) union of `num_boxes` axis-aligned boxes, sides uniform in [min_side, max_side] of the image side."""
    mask = torch.zeros(1, height, width)
    for _ in range(num_boxes):
        bh = max(1, round(_uniform(generator, min_side, max_side) * height))
        bw = max(1, round(_uniform(generator, min_side, max_side) * width))
        y0, x0 = _randint(generator, 0, height - bh), _randint(generator, 0, width - bw)
        mask[:, y0 : y0 + bh, x0 : x0 + bw] = 1.0
    return mask
