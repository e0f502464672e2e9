"""Reading images and masks of any mode into RGB images and binary masks."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from defectfill.core.errors import DefectFillError

if TYPE_CHECKING:  # torch is imported where a tensor is made: reading datasets and settings needs no torch
    import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def open_image(path: str | Path, load: bool = True) -> Image.Image:
    """The one way defectfill opens an image file: every failure is a DefectFillError naming the file.

    `load`: decode it now (a truncated or corrupt file fails here); False reads only the header (size, mode),
    which still refuses a decompression bomb (PIL's `DecompressionBombError`, which is not an `OSError`).
    """
    path = Path(path)
    if not path.exists():
        raise DefectFillError(f"{path}: file not found.")
    image = None
    try:
        image = Image.open(path)
        if load:
            image.load()
    except Image.DecompressionBombError as exc:  # PIL's guard against images that would exhaust memory
        raise DefectFillError(f"{path}: image is too large to read safely ({exc}). Downscale it (e.g. to a few "
                              "thousand pixels a side) or remove it.") from None
    except PermissionError as exc:
        raise DefectFillError(f"{path}: cannot read this file ({exc.strerror or exc}). Check its permissions.") \
            from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        if image is not None:
            image.close()
        raise DefectFillError(f"{path}: cannot read this file as an image ({exc}). Replace or remove it.") from None
    return image


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the header only, through `open_image`."""
    with open_image(path, load=False) as image:
        return image.size


def image_mode(path: str | Path) -> str:
    """The PIL mode from the header only, through `open_image`."""
    with open_image(path, load=False) as image:
        return image.mode


def _to_uint8_array(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> HxW or HxWxC uint8, scaling 16-bit and float data to 0..255."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        if image.mode == "F" and arr.max(initial=0) <= 1.0:
            top = 1.0
        return np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return np.asarray(image)


def load_rgb(path: str | Path) -> Image.Image:
    """Open any image (L, LA, P, RGB, RGBA, CMYK, 16-bit) as 8-bit RGB.

    Transparency is composited on black, the usual background of inspection photos.
    """
    image = open_image(path)
    if image.mode in ("RGB",):
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return Image.fromarray(_to_uint8_array(image)).convert("RGB")
    return image.convert("RGB")


MASK_RULES = ("auto", "half", "nonzero")
LOSSY_SUFFIXES = (".jpg", ".jpeg", ".webp")
# A lossy (JPEG) mask's compression noise around black stays below this; labels are read above it.
_LOSSY_NOISE = 16
# A colour mask with at most this many colours is a label mask (each colour a label), not a photo of one.
_LABEL_COLOURS = 16
REFERENCE = "#"  # `<file>#<reader>:<query>`: a mask drawn from annotations (`data.annotations`), not a file of its own


def mask_file(path: str | Path) -> Path:
    """The file a mask is read from: the path itself, or the annotation file of a mask reference
    (`annotations/instances_default.json#coco:image=3&category=2` -> `annotations/instances_default.json`)."""
    text = str(path)
    if REFERENCE in text:
        head, _, tail = text.rpartition(REFERENCE)
        if ":" in tail and tail.split(":", 1)[0] in _reference_readers():
            return Path(head)
    return Path(path)


def _reference_readers() -> dict:
    from defectfill.data.annotations import READERS  # the annotation formats register their readers there

    return READERS


def _reference(path: str | Path) -> tuple[Path, str, str] | None:
    """(file, reader, query) of a mask reference, or None for a plain mask file."""
    file = mask_file(path)
    if file == Path(path):
        return None
    reader, _, query = str(path).rpartition(REFERENCE)[2].partition(":")
    return file, reader, query


def _brightest(image: Image.Image) -> np.ndarray:
    """HxW uint8: the brightest colour channel (alpha ignored), 16-bit and float scaled to 0..255."""
    if image.mode in ("RGBA", "LA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")
    arr = _to_uint8_array(image) if image.mode not in ("1",) else np.asarray(image).astype(np.uint8) * 255
    return arr.max(axis=2) if arr.ndim == 3 else arr


def load_labels(path: str | Path) -> np.ndarray:
    """A label mask's stored labels as an int64 HxW array (0 = background).

    One channel (class-id masks, 8 or 16 bit, a palette's indices): the stored value, the class id.
    Colour: the colour packed as R*65536 + G*256 + B (`rgb_label`), alpha ignored."""
    image = open_image(path)
    if image.mode in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L"):
        return np.asarray(image).astype(np.int64)
    if image.mode in ("LA", "PA"):
        return np.asarray(image)[..., 0].astype(np.int64)
    arr = np.asarray(image.convert("RGB")).astype(np.int64)
    return arr[..., 0] * 65536 + arr[..., 1] * 256 + arr[..., 2]


def rgb_label(r: int, g: int, b: int) -> int:
    """The label `load_labels` gives the colour (r, g, b)."""
    return r * 65536 + g * 256 + b


def _auto(image: Image.Image, path: Path) -> np.ndarray:
    """The "auto" rule: half of the range when something reaches it (0/255, anti-aliased, 16-bit masks), and
    any stored label otherwise (class ids 1, 2, ..., a dark label colour such as 100,0,0); a colour mask with
    a few colours (a label mask) counts every colour but black."""
    arr = _brightest(image)
    top = int(arr.max(initial=0))
    lossy = path.suffix.lower() in LOSSY_SUFFIXES
    if image.mode in ("RGB", "RGBA", "P") and not lossy and top > 0:
        rgb = np.asarray(image.convert("RGB"))
        colours = np.unique(rgb.reshape(-1, 3), axis=0)
        if len(colours) <= _LABEL_COLOURS:
            return rgb.max(axis=2) > 0
    if top >= 128 or top == 1:
        return arr >= 128 if top >= 128 else arr > 0
    return arr > (_LOSSY_NOISE if lossy else 0)


def load_mask(path: str | Path, rule: str = "auto") -> np.ndarray:
    """Open a mask as a boolean HxW array (True = defect).

    `rule` "auto" (every layout but VisA): 0/1, 0/255, anti-aliased 8-bit, 16-bit or colour masks are
    binarised at half of the full range of their brightest channel; a mask in which nothing reaches half of
    the range holds labels (class ids 2+, a dark label colour), and any non-zero label is defect; a colour
    label mask (few colours) counts every colour but black. Lossy (JPEG) masks ignore values up to 16.
    `rule` "half" (split files written before "auto"): half of the range only.
    `rule` "nonzero" (VisA, whose masks hold small instance ids 1, 2, ... rather than 255): every pixel whose
    stored value is not 0 is defect; a palette image is read by its indices, as VisA's own preparation reads it.
    A mask reference (`<file>#<reader>:<query>`, `data.annotations`) is drawn from its annotations, whatever
    the rule.
    """
    if rule not in MASK_RULES:
        raise ValueError(f"unknown mask rule {rule!r}; one of {', '.join(MASK_RULES)}")
    reference = _reference(path)
    if reference is not None:
        file, reader, query = reference
        return _reference_readers()[reader](file, query)
    image = open_image(path)
    if rule == "nonzero":
        if image.mode not in ("1", "L", "P", "LA", "PA", "RGB", "RGBA", "I", "I;16", "I;16B", "I;16L", "F"):
            image = image.convert("RGB")
        arr = np.asarray(image)
        if arr.ndim == 3:  # colour channels only: alpha says nothing about the defect
            arr = arr[..., :1] if image.mode in ("LA", "PA") else arr[..., :3]
            arr = arr.max(axis=2)
        return arr != 0
    if rule == "auto":
        return _auto(image, Path(path))
    arr = _brightest(image)
    if arr.max(initial=0) == 1:  # a 0/1 mask saved as 8-bit
        arr = arr * 255
    return arr >= 128


def save_mask(mask: np.ndarray, path: str | Path) -> None:
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(path)


def image_to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """PIL RGB -> (3, size, size) float in [-1, 1], resized with antialiasing."""
    import torch

    image = image.resize((size, size), Image.Resampling.BICUBIC) if image.size != (size, size) else image
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def letterbox_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(w, h, x0, y0): an image of width x height scaled, aspect kept, so its longer side is `size`, and
    where it sits centred in a size x size square."""
    scale = size / max(width, height)
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    return w, h, (size - w) // 2, (size - h) // 2


def letterbox(image: Image.Image, mask: np.ndarray | None, size: int, fill: float = -1.0
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An image (and its mask) in a size x size square without distortion.

    The image is scaled (bicubic) so its longer side is `size`, centred, and the rest padded with `fill`
    (in [-1, 1]; -1 is black). The mask is area-resized to the same scale with any coverage counting, so a
    thin defect never vanishes, and padded with 0. Returns the image (3, S, S) in [-1, 1], the mask
    (1, S, S) in {0, 1} (zeros when `mask` is None) and `valid` (1, S, S): 1 on the image, 0 on the padding.
    A square image is only resized: `valid` is all ones.
    """
    import torch
    import torch.nn.functional as F

    w, h, x0, y0 = letterbox_box(*image.size, size)
    scaled = image.resize((w, h), Image.Resampling.BICUBIC) if image.size != (w, h) else image
    out = torch.full((3, size, size), float(fill))
    out[:, y0:y0 + h, x0:x0 + w] = torch.from_numpy(np.asarray(scaled, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    out_mask = torch.zeros(1, size, size)
    if mask is not None:
        m = torch.from_numpy(mask.astype(np.float32))[None, None]
        if m.shape[-2:] != (h, w):
            m = (F.interpolate(m, size=(h, w), mode="area") > 0).float()
        out_mask[:, y0:y0 + h, x0:x0 + w] = m[0]
    valid = torch.zeros(1, size, size)
    valid[:, y0:y0 + h, x0:x0 + w] = 1.0
    return out, out_mask, valid
