"""The `coco` layout: a COCO instances export, as CVAT's "COCO 1.0" writes it (and FiftyOne, Roboflow, ...).

    <root>/images/<file_name>                       the images (CVAT: "save images"; else next to the JSON root)
    <root>/annotations/instances_default.json       {"images", "annotations", "categories"} (any *.json there)

What the format holds (cocodataset.org "data format", and pycocotools, which reads it): ``images`` with
``id``, ``file_name``, ``width``, ``height``; ``categories`` with ``id`` and ``name``; ``annotations`` with
``image_id``, ``category_id`` and a ``segmentation`` that is a list of polygons (flat ``[x1, y1, x2, y2, ...]``
in pixels) or a run-length code ``{"size": [h, w], "counts": ...}`` (a list of runs: uncompressed, as CVAT
writes masks with ``iscrowd`` 1; a string: compressed), decoded by pycocotools. An annotation without a
segmentation is read as its filled ``bbox`` ``[x, y, w, h]``. Each category is a defect type; images listed
without annotations are the defect-free ones (or `--good-images`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from defectfill.core.errors import DefectFillError
from defectfill.core.folders import contained
from defectfill.data.annotations import decode_coco_rle, fill_polygons, parse_query, reference
from defectfill.data.images import image_size
from defectfill.data.labelled import Labelled, LabelledLayout, folder_name

ANNOTATIONS = "annotations"


def _is_coco(data: object) -> bool:
    return isinstance(data, dict) and all(isinstance(data.get(k), list) for k in ("images", "annotations"))


@functools.lru_cache(maxsize=8)
def _read(path: str, mtime_ns: int, size: int) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DefectFillError(f"{path}: cannot read this file as JSON ({exc}). Export the annotations again "
                              "(COCO 1.0).") from None
    if not _is_coco(data):
        raise DefectFillError(f"{path}: not a COCO instances file (no 'images' and 'annotations' lists). Export "
                              "the task as COCO 1.0, or pass the --layout it is in.")
    by_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        if isinstance(ann, dict) and "image_id" in ann:
            by_image.setdefault(ann["image_id"], []).append(ann)
    return {"images": {im.get("id"): im for im in data["images"] if isinstance(im, dict)},
            "categories": {c.get("id"): str(c.get("name", c.get("id"))) for c in data.get("categories", [])
                           if isinstance(c, dict)},
            "by_image": by_image}


def read_file(path: Path) -> dict:
    """The COCO file, read once while it is unchanged: images and categories by id, annotations by image."""
    try:
        st = path.stat()
    except OSError:
        raise DefectFillError(f"{path}: annotation file not found. Restore it, or export the task again.") from None
    return _read(str(path), st.st_mtime_ns, st.st_size)


def _size(image: dict, root: Path, where: Path) -> tuple[int, int]:
    try:
        return int(image["width"]), int(image["height"])
    except (KeyError, TypeError, ValueError):
        pass
    path = _image_path(root, image, where)
    try:
        return image_size(path)
    except DefectFillError as exc:
        raise DefectFillError(f"{where}: image {image.get('file_name')!r} has no width/height and cannot be "
                              f"opened to read them ({exc}).") from None


def _image_path(root: Path, image: dict, where: Path) -> Path:
    name = str(image.get("file_name", ""))
    for base in (root / "images", root):
        path = contained(base, name, where)
        if path.is_file():
            return path
    return contained(root / "images", name, where)


def annotation_mask(ann: dict, width: int, height: int, where: Path) -> np.ndarray:
    seg = ann.get("segmentation")
    if isinstance(seg, dict):
        mask = decode_coco_rle(seg, width, height, where)
        if mask.shape != (height, width):
            raise DefectFillError(f"{where}: annotation {ann.get('id')} has an RLE of size {mask.shape[1]}x"
                                  f"{mask.shape[0]} on an image of {width}x{height}. Export again.")
        return mask
    if isinstance(seg, list) and seg:
        polys = seg if isinstance(seg[0], list) else [seg]
        return fill_polygons(polys, width, height)
    box = ann.get("bbox")
    if isinstance(box, list) and len(box) == 4:
        x, y, w, h = (float(v) for v in box)
        return fill_polygons([[x, y, x + w, y, x + w, y + h, x, y + h]], width, height)
    return np.zeros((height, width), bool)


def read_mask(file: Path, query: str) -> np.ndarray:
    """`image=<id>[&category=<id>,...]`: the union of that image's annotations (of those categories)."""
    q = parse_query(query, file)
    data = read_file(file)
    image_id = _id(q.get("image", ""))
    image = data["images"].get(image_id)
    if image is None:
        raise DefectFillError(f"{file}: no image with id {q.get('image')}; the annotations changed since the split "
                              "was written. Train again.")
    wanted = {_id(c) for c in q.get("category", "").split(",") if c.strip()}
    root = file.parent.parent if file.parent.name == ANNOTATIONS else file.parent
    width, height = _size(image, root, file)
    mask = np.zeros((height, width), bool)
    for ann in data["by_image"].get(image_id, []):
        if not wanted or ann.get("category_id") in wanted:
            mask |= annotation_mask(ann, width, height, file)
    return mask


def _id(text: str):
    try:
        return int(text)
    except ValueError:
        return text


class COCOLayout(LabelledLayout):
    name = "coco"

    @classmethod
    def matches(cls, root: Path) -> bool:
        return bool(cls.annotation_files(root))

    @staticmethod
    def annotation_files(root: Path) -> list[Path]:
        folder = root / ANNOTATIONS
        if not folder.is_dir():
            return []
        files = []
        for path in sorted(folder.glob("*.json")):
            try:
                with path.open(encoding="utf-8") as f:
                    head = f.read(4096)
            except (OSError, UnicodeDecodeError):
                continue
            if '"images"' in head or '"annotations"' in head or '"info"' in head or '"licenses"' in head:
                files.append(path)
        return files

    def read_labels(self) -> tuple[list[Labelled], list[Path]]:
        files = self.annotation_files(self.root)
        if not files:
            raise DefectFillError(f"{self.root / ANNOTATIONS}: no COCO annotation file (e.g. instances_default.json). "
                                  "Export the task as COCO 1.0 with its images.")
        labels, listed = [], []
        for file in files:
            data = read_file(file)
            for image_id, image in data["images"].items():
                path = _image_path(self.root, image, file)
                listed.append(path)
                by_type: dict[str, list] = {}
                for ann in data["by_image"].get(image_id, []):
                    name = data["categories"].get(ann.get("category_id"), str(ann.get("category_id")))
                    by_type.setdefault(folder_name(name), []).append(ann.get("category_id"))
                if by_type:
                    masks = {t: reference(file, "coco", image=image_id, category=",".join(map(str, sorted(set(ids)))))
                             for t, ids in by_type.items()}
                    labels.append(Labelled(path, masks, reference(file, "coco", image=image_id)))
        return sorted(labels, key=lambda r: r.image), listed
