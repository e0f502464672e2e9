"""Masks drawn from annotations: the mask references the annotation layouts hand out, and the readers that
draw them.

An imported layout (COCO, YOLO, Label Studio) has no mask files: its defects are polygons or run-length
codes inside an annotation file. So a `DefectSample`'s mask is a *reference*,
``<annotation file>#<reader>:<query>`` (``annotations/instances_default.json#coco:image=3&category=2``),
which `images.load_mask` draws on demand through `READERS`. A reference is a path like any mask path: it is
recorded in ``split.json`` relative to the dataset root, checked to stay inside it, listed in manifests, and
read by training, generation and evaluation unchanged; `images.mask_file` gives the file it reads. A label
mask file can be referenced too (``SegmentationClass/x.png#label:16711680``: only the pixels of that label,
the class id or packed colour `images.load_labels` gives), which is how a CVAT mask export's colours and a
class-id mask's ids become defect types.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from urllib.parse import parse_qs, urlencode

import numpy as np
from PIL import Image, ImageDraw

from defectfill.core.errors import DefectFillError


def reference(file: Path, reader: str, **query: object) -> Path:
    """The mask reference to `file` read by `reader` with `query` (values kept as strings)."""
    return Path(f"{file}#{reader}:{urlencode({k: str(v) for k, v in query.items()})}")


def parse_query(query: str, file: Path) -> dict[str, str]:
    try:
        return {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True, strict_parsing=bool(query)).items()}
    except ValueError:
        raise DefectFillError(f"{file}#{query}: not a mask reference defectfill wrote; rerun `defectfill train` "
                              "to write the split again.") from None


def _lazy(module: str, name: str) -> Callable[[Path, str], np.ndarray]:
    def read(file: Path, query: str) -> np.ndarray:
        return getattr(importlib.import_module(module), name)(file, query)

    return read


def read_label(file: Path, query: str) -> np.ndarray:
    """`label=<n>[,<m>...]`: the pixels of a label mask file holding one of those labels."""
    from defectfill.data.images import load_labels

    labels = [int(v) for v in parse_query(query, file).get("label", "").split(",") if v.strip()]
    return np.isin(load_labels(file), labels)


READERS: dict[str, Callable[[Path, str], np.ndarray]] = {
    "label": read_label,
    "coco": _lazy("defectfill.data.coco", "read_mask"),
    "yolo": _lazy("defectfill.data.yolo", "read_mask"),
    "cvat": _lazy("defectfill.data.cvat", "read_mask"),
    "ls": _lazy("defectfill.data.labelstudio", "read_mask"),
}


def fill_polygons(polygons: Iterable[Sequence[float]], width: int, height: int) -> np.ndarray:
    """Bool HxW: the union of polygons given as flat pixel coordinates [x1, y1, x2, y2, ...] (pixel centres
    at .5, as COCO writes them); polygons of fewer than 3 points are skipped."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in polygons:
        pts = [float(v) for v in poly]
        if len(pts) < 6:
            continue
        draw.polygon([(pts[i] - 0.5, pts[i + 1] - 0.5) for i in range(0, len(pts) - 1, 2)], fill=255, outline=255)
    return np.asarray(canvas) > 0


def need_pycocotools(where: Path):
    try:
        from pycocotools import mask as coco_mask
    except ImportError:
        raise DefectFillError(f"{where}: holds COCO run-length (RLE) masks, which defectfill reads with pycocotools. "
                              "Install it: pip install 'defectfill[formats]' (or pip install pycocotools).") from None
    return coco_mask


def decode_coco_rle(rle: dict, width: int, height: int, where: Path) -> np.ndarray:
    """Bool HxW from a COCO RLE, compressed (``counts`` a string) or not (a list of run lengths)."""
    coco_mask = need_pycocotools(where)
    try:
        size = [int(v) for v in rle.get("size", [height, width])]
        counts = rle["counts"]
        if isinstance(counts, list):
            rle = coco_mask.frPyObjects({"size": size, "counts": [int(c) for c in counts]}, size[0], size[1])
        else:
            rle = {"size": size, "counts": counts.encode() if isinstance(counts, str) else counts}
        mask = coco_mask.decode(rle)
    except (KeyError, TypeError, ValueError) as exc:
        raise DefectFillError(f"{where}: a segmentation's RLE cannot be decoded ({exc}). Export the annotations "
                              "again.") from None
    return mask.astype(bool)


def encode_coco_rle(mask: np.ndarray) -> dict:
    """A COCO compressed RLE ({"size": [h, w], "counts": str}) of a bool HxW mask, by pycocotools."""
    coco_mask = need_pycocotools(Path("COCO export"))
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


# ---------------------------------------------------------------- Label Studio brush RLE
#
# Label Studio stores a brush mask as the RGBA bitmap of the image (H x W x 4 bytes, row-major) packed by the
# rle-pack scheme of thi.ng/umbrella, which its front end uses: a bit stream (most significant bit first) of a
# 32-bit value count, a 5-bit word size minus 1, four 4-bit run-length field sizes minus 1, then chunks: one
# flag bit (1: a run of one repeated value, 0: literal values), a 2-bit index into the field sizes, the chunk's
# length minus 1 in that many bits, and the value (run) or that many values (literals) of word-size bits each.
# We decode and encode it here (about 60 lines of our own) rather than depending on label-studio-converter,
# which brings pandas, nltk, requests and more for this one function and walks a string of '0'/'1' characters;
# tests check ours against its decode_rle / encode_rle both ways.


class _Bits:
    def __init__(self, data: bytes):
        self.bits = np.unpackbits(np.frombuffer(bytes(data), dtype=np.uint8))
        self.pos = 0

    def read(self, n: int) -> int:
        if self.pos + n > len(self.bits):
            raise ValueError("the code ends early")
        value = 0
        for b in self.bits[self.pos:self.pos + n]:
            value = (value << 1) | int(b)
        self.pos += n
        return value


def decode_brush_rle(rle: Sequence[int]) -> np.ndarray:
    """The flat uint values a Label Studio brush ``rle`` list encodes (H*W*4 RGBA bytes for a mask)."""
    bits = _Bits(bytes(int(v) & 0xFF for v in rle))
    count, word = bits.read(32), bits.read(5) + 1
    sizes = [bits.read(4) + 1 for _ in range(4)]
    out = np.zeros(count, dtype=np.uint32 if word > 16 else np.uint16 if word > 8 else np.uint8)
    i = 0
    while i < count:
        repeat = bits.read(1)
        end = min(count, i + 1 + bits.read(sizes[bits.read(2)]))
        if repeat:
            out[i:end] = bits.read(word)
        else:
            for k in range(i, end):
                out[k] = bits.read(word)
        i = end
    return out


def brush_mask(rle: Sequence[int], width: int, height: int, where: str) -> np.ndarray:
    """Bool HxW of a Label Studio brush result: its RGBA bitmap's alpha channel, non-zero = painted."""
    try:
        flat = decode_brush_rle(rle)
    except (ValueError, TypeError) as exc:
        raise DefectFillError(f"{where}: a brush mask's RLE cannot be decoded ({exc}). Export the project again "
                              "(JSON).") from None
    if flat.size != width * height * 4:
        raise DefectFillError(f"{where}: a brush mask holds {flat.size} values, not {width}x{height}x4 "
                              "(original_width x original_height x RGBA). Export the project again (JSON).")
    return flat.reshape(height, width, 4)[..., 3] > 0


def encode_brush_rle(mask: np.ndarray) -> list[int]:
    """A bool HxW mask as a Label Studio brush ``rle`` list: an RGBA bitmap whose every channel is 255 on the
    mask and 0 elsewhere, packed in runs (8-bit words; run lengths in fields of 2, 4, 8 or 16 bits)."""
    flat = np.repeat(mask.reshape(-1).astype(np.uint8) * 255, 4)
    sizes = (2, 4, 8, 16)
    bits: list[str] = [format(len(flat), "032b"), format(8 - 1, "05b")]
    bits += [format(s - 1, "04b") for s in sizes]
    change = np.flatnonzero(np.diff(flat)) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [len(flat)]])
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        value = int(flat[start])
        while start < end:
            n = min(end - start, 1 << sizes[-1])
            index = next(k for k, s in enumerate(sizes) if n - 1 < (1 << s))
            bits.append("1" + format(index, "02b") + format(n - 1, f"0{sizes[index]}b") + format(value, "08b"))
            start += n
    stream = "".join(bits)
    stream += "0" * (-len(stream) % 8)
    return [int(stream[k:k + 8], 2) for k in range(0, len(stream), 8)]
