"""The `yolo` layout: an Ultralytics YOLO segmentation dataset (as Ultralytics and CVAT's "Ultralytics YOLO
Segmentation" export write it).

    <root>/data.yaml                    names: the classes, a list or {id: name}
    <root>/images/[<subset>/]<stem>.png the images (any subset folders: train/, val/, ...)
    <root>/labels/[<subset>/]<stem>.txt one object a line: <class> <x1> <y1> <x2> <y2> ... (0..1 of width/height)

What the format holds (docs.ultralytics.com/datasets/segment): one label file per image at the image's path
with ``images`` replaced by ``labels`` and a ``.txt`` suffix; each line a class index and a polygon of at
least 3 normalised points. A line of exactly 5 numbers is a detection box (class, centre x, centre y, width,
height) and is read as its filled box. An image without a label file, or with an empty one, is defect-free
(or `--good-images`). Each class of ``names`` is a defect type (``class_<n>`` when ``data.yaml`` is absent).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from defectfill.core.errors import DefectFillError
from defectfill.data.annotations import fill_polygons, parse_query, reference
from defectfill.data.images import image_size
from defectfill.data.labelled import Labelled, LabelledLayout, all_images, folder_name, read_label_text

YAML_NAMES = ("data.yaml", "dataset.yaml", "data.yml")


def _lines(path: Path) -> list[tuple[int, list[float]]]:
    rows = []
    text = read_label_text(path, "label file")
    for number, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            cls, values = int(float(parts[0])), [float(v) for v in parts[1:]]
        except ValueError:
            raise DefectFillError(f"{path} line {number}: not '<class> <x1> <y1> ...' numbers: {line.strip()!r}. "
                                  "Fix or remove the line.") from None
        if len(values) != 4 and (len(values) < 6 or len(values) % 2):
            raise DefectFillError(f"{path} line {number}: a polygon needs at least 3 x,y pairs (or a box of 4 "
                                  f"numbers); found {len(values)} numbers. Fix or remove the line.")
        rows.append((cls, values))
    return rows


def read_mask(file: Path, query: str) -> np.ndarray:
    """`w=<width>&h=<height>[&class=<n>,...]`: the union of the label file's objects (of those classes)."""
    q = parse_query(query, file)
    try:
        width, height = int(q["w"]), int(q["h"])
    except (KeyError, ValueError):
        raise DefectFillError(f"{file}#{query}: not a mask reference defectfill wrote; train again.") from None
    if not file.is_file():
        raise DefectFillError(f"{file}: label file not found; restore it, or export the dataset again.")
    wanted = {int(c) for c in q.get("class", "").split(",") if c.strip()}
    polys = []
    for cls, v in _lines(file):
        if wanted and cls not in wanted:
            continue
        if len(v) == 4:
            cx, cy, bw, bh = v
            v = [cx - bw / 2, cy - bh / 2, cx + bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2, cx - bw / 2, cy + bh / 2]
        polys.append([c * (width if k % 2 == 0 else height) for k, c in enumerate(v)])
    return fill_polygons(polys, width, height)


class YOLOLayout(LabelledLayout):
    name = "yolo"

    @classmethod
    def matches(cls, root: Path) -> bool:
        return (root / "images").is_dir() and (root / "labels").is_dir()

    def class_names(self) -> dict[int, str]:
        for name in YAML_NAMES:
            path = self.root / name
            if path.is_file():
                import yaml

                try:
                    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
                except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
                    raise DefectFillError(f"{path}: cannot read this file as YAML ({exc}).") from None
                names = data.get("names") if isinstance(data, dict) else None
                if isinstance(names, list):
                    return {i: str(n) for i, n in enumerate(names)}
                if isinstance(names, dict):
                    try:
                        return {int(k): str(v) for k, v in names.items()}
                    except (TypeError, ValueError):
                        pass
                raise DefectFillError(f"{path}: no 'names' (a list of class names, or id: name). Add the classes.")
        return {}

    def read_labels(self) -> tuple[list[Labelled], list[Path]]:
        names = self.class_names()
        images = all_images(self.root / "images")
        labels = []
        for image in images:
            label = (self.root / "labels" / image.relative_to(self.root / "images")).with_suffix(".txt")
            if not label.is_file():
                continue
            classes = sorted({cls for cls, _ in _lines(label)})
            if not classes:
                continue
            unknown = [c for c in classes if names and c not in names]
            if unknown:
                raise DefectFillError(f"{label}: class {unknown[0]} is not in {self.root / YAML_NAMES[0]}'s names "
                                      f"({', '.join(f'{k}: {v}' for k, v in sorted(names.items()))}). Add it there.")
            width, height = image_size(image)
            by_type: dict[str, list[int]] = {}
            for c in classes:
                by_type.setdefault(folder_name(names.get(c, f"class_{c}")), []).append(c)
            masks = {t: reference(label, "yolo", w=width, h=height, **{"class": ",".join(map(str, cs))})
                     for t, cs in by_type.items()}
            labels.append(Labelled(image, masks, reference(label, "yolo", w=width, h=height)))
        return labels, images
