"""The `labelstudio` layout: a Label Studio project exported as "JSON" (the task list), with its images.

    <root>/<export>.json                [{"id", "data": {"image": ...}, "annotations": [{"result": [...]}]}, ...]
    <root>/images/... (or anywhere under <root>)   the images, found by file name

What the format holds (labelstud.io: the export guide and the PolygonLabels, BrushLabels, RectangleLabels
tags): each task's ``data`` names its image (an upload path ``/data/upload/<project>/<8 hex>-<name>``, a local
storage path ``/data/local-files/?d=<path>``, or a URL); each annotation's ``result`` is a list of regions with
``original_width`` and ``original_height`` in pixels and a ``value``: ``points`` (polygons, in percent of the
image size) with ``polygonlabels``; ``format: "rle"`` and ``rle`` (the brush's RGBA bitmap, packed as
`annotations.decode_brush_rle` reads it) with ``brushlabels``; or ``x``, ``y``, ``width``, ``height`` (percent,
``rotation`` in degrees about the top-left corner) with ``rectanglelabels``. An image is found under the root by
its file name, with or without the upload's 8-hex prefix. The first annotation of a task that was not
cancelled is read; each label is a defect type; tasks without regions are defect-free (or `--good-images`).
"""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np

from defectfill.core.errors import DefectFillError
from defectfill.core.folders import contained
from defectfill.data.annotations import brush_mask, fill_polygons, parse_query, reference
from defectfill.data.labelled import Labelled, LabelledLayout, all_images, folder_name

LABEL_KEYS = ("polygonlabels", "brushlabels", "rectanglelabels", "labels")
_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")


def _looks_like_export(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8") as f:
            head = f.read(4096).lstrip()
    except (OSError, UnicodeDecodeError):
        return False
    return head.startswith("[") and '"data"' in head


@functools.lru_cache(maxsize=8)
def _read(path: str, mtime_ns: int, size: int) -> dict:
    try:
        tasks = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DefectFillError(f"{path}: cannot read this file as JSON ({exc}). Export the project again "
                              "(Export > JSON).") from None
    if not isinstance(tasks, list):
        raise DefectFillError(f"{path}: not a Label Studio JSON export (a list of tasks). Export the project with "
                              "Export > JSON.")
    by_id = {}
    for k, task in enumerate(tasks):
        if isinstance(task, dict):
            by_id[str(task.get("id", k))] = task
    return by_id


def read_tasks(path: Path) -> dict[str, dict]:
    st = path.stat()
    return _read(str(path), st.st_mtime_ns, st.st_size)


def regions(task: dict) -> list[dict]:
    """The labelled regions of the task's first annotation that was not cancelled."""
    for ann in task.get("annotations") or task.get("completions") or []:
        if isinstance(ann, dict) and not ann.get("was_cancelled"):
            return [r for r in ann.get("result", []) if isinstance(r, dict) and isinstance(r.get("value"), dict)
                    and region_labels(r)]
    return []


def region_labels(region: dict) -> list[str]:
    value = region["value"]
    for key in LABEL_KEYS:
        if isinstance(value.get(key), list):
            return [str(v) for v in value[key]]
    return []


def region_mask(region: dict, where: str) -> np.ndarray:
    value = region["value"]
    try:
        width, height = int(region["original_width"]), int(region["original_height"])
    except (KeyError, TypeError, ValueError):
        raise DefectFillError(f"{where}: a region has no original_width/original_height. Export the project "
                              "again (JSON).") from None
    if value.get("format") == "rle" or "rle" in value:
        return brush_mask(value["rle"], width, height, where)
    if "points" in value:
        pts = [c for p in value["points"] for c in (float(p[0]) * width / 100, float(p[1]) * height / 100)]
        return fill_polygons([[v + 0.5 for v in pts]], width, height)
    if all(k in value for k in ("x", "y", "width", "height")):
        x, y = float(value["x"]) * width / 100, float(value["y"]) * height / 100
        w, h = float(value["width"]) * width / 100, float(value["height"]) * height / 100
        a = math.radians(float(value.get("rotation", 0) or 0))
        corners = [(0, 0), (w, 0), (w, h), (0, h)]
        pts = [c for dx, dy in corners
               for c in (x + dx * math.cos(a) - dy * math.sin(a) + 0.5, y + dx * math.sin(a) + dy * math.cos(a) + 0.5)]
        return fill_polygons([pts], width, height)
    raise DefectFillError(f"{where}: a region is neither a polygon, a brush mask nor a rectangle. Export again.")


def read_mask(file: Path, query: str) -> np.ndarray:
    """`task=<id>[&label=<name>]`: the union of the task's regions (with that label, as a defect type)."""
    q = parse_query(query, file)
    task = read_tasks(file).get(q.get("task", ""))
    if task is None:
        raise DefectFillError(f"{file}: no task {q.get('task')}; the export changed since the split was written. "
                              "Train again.")
    where = f"{file} task {q.get('task')}"
    wanted = q.get("label")
    mask = None
    for region in regions(task):
        if wanted and wanted not in {folder_name(n) for n in region_labels(region)}:
            continue
        m = region_mask(region, where)
        if mask is not None and m.shape != mask.shape:
            raise DefectFillError(f"{where}: regions of different image sizes. Export again.")
        mask = m if mask is None else mask | m
    if mask is None:
        raise DefectFillError(f"{where}: no region{' labelled ' + wanted if wanted else ''}; train again.")
    return mask


def task_image(task: dict) -> str | None:
    data = task.get("data")
    if not isinstance(data, dict):
        return None
    value = data.get("image")
    if not isinstance(value, str):
        value = next((v for v in data.values() if isinstance(v, str)), None)
    return value


class LabelStudioLayout(LabelledLayout):
    name = "labelstudio"

    @classmethod
    def matches(cls, root: Path) -> bool:
        return bool(cls.export_files(root))

    @staticmethod
    def export_files(root: Path) -> list[Path]:
        return [p for p in sorted(root.glob("*.json")) if _looks_like_export(p)]

    def _find(self, ref: str, index: dict[str, list[Path]], where: Path) -> Path | None:
        url = urlparse(ref)
        local = parse_qs(url.query).get("d")
        if local:
            path = contained(self.root, unquote(local[0]).lstrip("/"), where)
            if path.is_file():
                return path
            name = Path(unquote(local[0])).name
        else:
            name = Path(unquote(url.path)).name
        for candidate in (name, _UPLOAD_PREFIX.sub("", name)):
            if candidate in index:
                return index[candidate][0]
        return None

    def read_labels(self) -> tuple[list[Labelled], list[Path]]:
        files = self.export_files(self.root)
        if not files:
            raise DefectFillError(f"{self.root}: no Label Studio JSON export (a .json list of tasks) here. Export "
                                  "the project with Export > JSON and save it in this folder with the images.")
        index: dict[str, list[Path]] = {}
        for p in all_images(self.root):
            index.setdefault(p.name, []).append(p)
        labels, listed = [], []
        for file in files:
            for task_id, task in read_tasks(file).items():
                ref = task_image(task)
                if ref is None:
                    continue
                image = self._find(ref, index, file)
                if image is None:
                    raise DefectFillError(f"{file} task {task_id}: image {ref!r} not found under {self.root} (looked "
                                          f"for {Path(urlparse(ref).path).name!r} with and without the upload "
                                          "prefix). Copy the project's images into this folder (e.g. images/).")
                listed.append(image)
                types = sorted({folder_name(n) for r in regions(task) for n in region_labels(r)})
                if types:
                    masks = {t: reference(file, "ls", task=task_id, label=t) for t in types}
                    labels.append(Labelled(image, masks, reference(file, "ls", task=task_id)))
        return sorted(labels, key=lambda r: r.image), listed
