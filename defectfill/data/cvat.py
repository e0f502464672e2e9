"""The `cvat` layout: CVAT's "Segmentation mask 1.1" export (Pascal VOC segmentation with CVAT's label map).

    <root>/labelmap.txt                 one label a line: <name>:<r>,<g>,<b>:<parts>:<actions> ('#' comments)
    <root>/SegmentationClass/<stem>.png each pixel the colour of its label (background 0,0,0)
    <root>/JPEGImages/<stem>.jpg        the images (CVAT: "save images"; or images/)
    <root>/ImageSets/Segmentation/default.txt, SegmentationObject/   (not needed)

What the format holds (docs.cvat.ai, "Segmentation Mask"): the class masks are PNGs of 1 or 3 channels whose
every pixel has its label's colour from ``labelmap.txt`` (Pascal VOC's colours by default); the colour
(0, 0, 0) is the background. So each label but the background is a defect type, its mask the pixels of its
colour, matched exactly (no half-range rule: a dark label colour such as 100,0,0 is a label like any other).
Without ``labelmap.txt`` each colour found becomes a type named ``rgb_<r>_<g>_<b>``. Images whose class mask
holds only background (or that have none) are defect-free (or `--good-images`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from defectfill.core.errors import DefectFillError
from defectfill.data.annotations import parse_query, reference
from defectfill.data.images import is_image_file, open_image
from defectfill.data.labelled import Labelled, LabelledLayout, all_images, folder_name, read_label_text

LABELMAP = "labelmap.txt"
CLASS_MASKS = "SegmentationClass"
IMAGE_FOLDERS = ("JPEGImages", "images")


def _colours(path: Path) -> np.ndarray:
    """HxWx3 uint8: a class mask's colours (a palette mask through its palette)."""
    image = open_image(path)
    return np.asarray(image.convert("RGB"))


def read_mask(file: Path, query: str) -> np.ndarray:
    """`rgb=<r>,<g>,<b>[;<r>,<g>,<b>...]`: the pixels of a class mask in one of those colours."""
    spec = parse_query(query, file).get("rgb", "")
    try:
        colours = [tuple(int(v) for v in c.split(",")) for c in spec.split(";") if c.strip()]
    except ValueError:
        raise DefectFillError(f"{file}#{query}: not a mask reference defectfill wrote; train again.") from None
    arr = _colours(file)
    mask = np.zeros(arr.shape[:2], bool)
    for colour in colours:
        mask |= np.all(arr == np.array(colour, np.uint8), axis=2)
    return mask


def read_labelmap(path: Path) -> dict[tuple[int, int, int], str]:
    """colour -> label name of a labelmap.txt, the background (0, 0, 0) left out."""
    labels: dict[tuple[int, int, int], str] = {}
    text = read_label_text(path)
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition(":")
        try:
            colour = tuple(int(v) for v in rest.split(":", 1)[0].split(","))
        except ValueError:
            colour = ()
        if len(colour) != 3 or not all(0 <= v <= 255 for v in colour):
            raise DefectFillError(f"{path} line {number}: expected '<label>:<r>,<g>,<b>::', got {line!r}. "
                                  "Fix the line or export the task again.")
        if colour != (0, 0, 0):
            labels[colour] = name.strip()
    return labels


class CVATMaskLayout(LabelledLayout):
    name = "cvat"

    @classmethod
    def matches(cls, root: Path) -> bool:
        return (root / CLASS_MASKS).is_dir()

    def _image_for(self, stem: str) -> Path | None:
        for folder in IMAGE_FOLDERS:
            base = self.root / folder
            if base.is_dir():
                for p in sorted(base.glob(f"{stem}.*")):
                    if is_image_file(p):
                        return p
        return None

    def read_labels(self) -> tuple[list[Labelled], list[Path]]:
        labelmap = read_labelmap(self.root / LABELMAP) if (self.root / LABELMAP).is_file() else None
        images = [p for folder in IMAGE_FOLDERS for p in all_images(self.root / folder)]
        if not images:
            raise DefectFillError(f"{self.root}: no images in {' or '.join(IMAGE_FOLDERS)}/. Export the task with "
                                  "'Save images' on, or copy the images into JPEGImages/.")
        labels = []
        for mask_path in all_images(self.root / CLASS_MASKS):
            image = self._image_for(mask_path.stem)
            if image is None:
                raise DefectFillError(f"{mask_path}: no image named {mask_path.stem}.* in "
                                      f"{' or '.join(IMAGE_FOLDERS)}/. Export with 'Save images', or remove the mask.")
            found = {tuple(int(v) for v in c) for c in np.unique(_colours(mask_path).reshape(-1, 3), axis=0)}
            found.discard((0, 0, 0))
            if labelmap is not None:
                unknown = sorted(found - set(labelmap))
                if unknown:
                    raise DefectFillError(f"{mask_path}: colour {','.join(map(str, unknown[0]))} is not in "
                                          f"{self.root / LABELMAP}. Add its label there, or export again.")
            by_type: dict[str, list[tuple[int, int, int]]] = {}
            for colour in sorted(found):
                name = labelmap[colour] if labelmap is not None else "rgb_" + "_".join(map(str, colour))
                by_type.setdefault(folder_name(name), []).append(colour)
            if not by_type:
                continue
            masks = {t: reference(mask_path, "cvat", rgb=";".join(",".join(map(str, c)) for c in cs))
                     for t, cs in by_type.items()}
            union = reference(mask_path, "cvat", rgb=";".join(",".join(map(str, c)) for c in sorted(found)))
            labels.append(Labelled(image, masks, union))
        return labels, images
