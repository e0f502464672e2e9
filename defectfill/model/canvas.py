"""The canvas an image is sampled on: its aspect kept, its longer side the run's resolution, padded to whole
latent cells, the mask grown to those cells. Generation samples on it and training builds its sample images on
it, so both condition the UNet alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from defectfill.model.pipeline import dilate_to_latent_cells


@dataclass
class Canvas:
    """Where an image is sampled: `scaled` (w, h) is the image at the model's scale, its aspect kept and its
    longer side the run's resolution; `size` (w, h) is that rounded up to whole latent cells (padding at the
    right and bottom, cut off again after sampling)."""

    scaled: tuple[int, int]
    size: tuple[int, int]


def canvas_for(size: tuple[int, int], resolution: int, factor: int) -> Canvas:
    """The canvas of an image of `size` (w, h): longer side `resolution`, aspect kept, sides padded to multiples
    of the VAE factor. Never a stretch: resizing a non-square image to the square would distort it, and its
    defects with it."""
    w, h = size
    scale = resolution / max(w, h)
    sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
    return Canvas((sw, sh), (-(-sw // factor) * factor, -(-sh // factor) * factor))


def prepare_canvas(image: Image.Image, mask: np.ndarray, resolution: int, factor: int
                   ) -> tuple[Canvas, Image.Image, Image.Image]:
    """The image (bicubic, edge pixels repeated into the padding) and the mask the pipeline gets on the canvas.

    The mask is area-resized with any coverage counting (a thin mask never vanishes at the model's size) and
    grown to whole latent cells: the pipeline's own nearest resize to the latent grid would otherwise keep one
    pixel per cell, so the UNet's mask channel would say "keep" over most of a thin scratch while the masked
    image is grey there. Grown, the mask channel covers every cell the mask touches and the masked image is grey
    over exactly those cells: the condition training builds (`pipeline.encode_inpaint_condition`). Paste-back
    uses the exact pixel mask at the source's size.
    """
    canvas = canvas_for(image.size, resolution, factor)
    (sw, sh), (cw, ch) = canvas.scaled, canvas.size
    scaled = image.resize((sw, sh), Image.Resampling.BICUBIC) if image.size != (sw, sh) else image
    padded = np.pad(np.asarray(scaled), ((0, ch - sh), (0, cw - sw), (0, 0)), mode="edge")
    m = torch.from_numpy(mask.astype(np.float32))[None, None]  # (1, 1, H, W)
    m = (F.interpolate(m, size=(sh, sw), mode="area") > 0).float()
    m = F.pad(m, (0, cw - sw, 0, ch - sh))
    cells = dilate_to_latent_cells(m, factor)[0, 0].numpy()
    return canvas, Image.fromarray(padded), Image.fromarray(cells.astype(np.uint8) * 255, mode="L")
