"""The reference / held-out split of one defect type, and its checks.

Per docs/method.md: sorted by file name, the first third (at least one) trains, the
rest is held out for evaluation and for the masks of generation. Samples whose
mask is empty are skipped with a warning before splitting; images that show
several defect types (VisA) are left out of a single-type split and counted.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from defectfill.core.atomic import write_json
from defectfill.core.errors import DefectFillError
from defectfill.core.folders import contained
from defectfill.data.images import MASK_RULES, load_mask, mask_file, open_image
from defectfill.data.layouts import DefectSample, Layout, find_type

log = logging.getLogger(__name__)


@dataclass
class Split:
    layout: str
    data_root: Path
    category: str
    defect_type: str
    reference: list[DefectSample]
    held_out: list[DefectSample]
    skipped_empty: list[DefectSample]
    multi_type: list[DefectSample] = field(default_factory=list)  # left out: they show other types too

    @property
    def mask_rule(self) -> str:
        """How this split's masks are read (`images.load_mask`)."""
        return next((s.mask_rule for s in self.reference + self.held_out + self.skipped_empty), "auto")

    def to_json(self) -> dict:
        def rows(samples: list[DefectSample]) -> list[dict]:
            return [{"image": relative_name(self.data_root, s.image), "mask": relative_name(self.data_root, s.mask)}
                    for s in samples]

        return {
            "layout": self.layout,
            "data_root": str(self.data_root.resolve()),
            "category": self.category,
            "defect_type": self.defect_type,
            "mask_rule": self.mask_rule,
            "reference": rows(self.reference),
            "held_out": rows(self.held_out),
            "skipped_empty_masks": rows(self.skipped_empty),
            "left_out_multi_type": rows(self.multi_type),
        }

    def save(self, path: str | Path) -> None:
        write_json(path, with_relative_root(self.to_json(), self.data_root, path))


def with_relative_root(data: dict, root: Path, path: str | Path) -> dict:
    """A split's JSON with `data_root_from_split`: the dataset root relative to the split file's folder, which
    `read_split` prefers when it exists (the run and its dataset moved together; any working directory)."""
    folder = Path(path).expanduser().absolute().parent
    return {**data, "data_root_from_split": os.path.relpath(Path(root).expanduser().absolute(), folder)}


def relative_name(root: Path, path: Path | None) -> str | None:
    """`path` as written relative to the dataset root (as split files and `defectfill data` show it)."""
    if path is None:
        return None
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


@dataclass
class MultiSample:
    """An image labelled with several defect types (VisA), its one mask covering all of them."""

    sample: DefectSample
    types: tuple[str, ...]


@dataclass
class ObjectSplit:
    """The split of a per-object run: each type's own `Split`, and the multi-type images whose types are all
    trained (divided like a type's images: the first third by file name trains, the rest is held out)."""

    category: str
    splits: dict[str, Split]
    multi_reference: list[MultiSample] = field(default_factory=list)
    multi_held_out: list[MultiSample] = field(default_factory=list)

    def to_json(self) -> dict:
        first = next(iter(self.splits.values()))

        def rows(samples: list[MultiSample]) -> list[dict]:
            return [{"image": relative_name(first.data_root, m.sample.image),
                     "mask": relative_name(first.data_root, m.sample.mask), "types": list(m.types)} for m in samples]

        return {"per_object": True, "layout": first.layout, "data_root": str(first.data_root.resolve()),
                "category": self.category, "defect_types": list(self.splits), "mask_rule": first.mask_rule,
                "types": {t: s.to_json() for t, s in self.splits.items()},
                "multi_type": {"reference": rows(self.multi_reference), "held_out": rows(self.multi_held_out)}}

    def save(self, path: str | Path) -> None:
        write_json(path, with_relative_root(self.to_json(), next(iter(self.splits.values())).data_root, path))


def make_object_split(layout: Layout, category: str, defect_types: list[str]) -> ObjectSplit:
    """Each type's split, and the multi-type images (VisA) whose types are all among `defect_types`."""
    splits = {t: make_split(layout, category, t) for t in defect_types}
    kept = []
    for sample, types in layout.multi_type_images(category):
        if not set(types) <= set(defect_types):
            continue  # it shows a type this model does not learn
        if check_sample(sample):
            kept.append(MultiSample(sample, types))
        else:
            log.warning("%s: mask is empty (no defect pixels); skipping this image.", sample.mask)
    kept.sort(key=lambda m: m.sample.image.name)
    n_ref = max(1, len(kept) // 3) if kept else 0
    if kept:
        log.info("%s: %d multi-type image(s) train with all their types' tokens, %d held out", category, n_ref,
                 len(kept) - n_ref)
    return ObjectSplit(category, splits, kept[:n_ref], kept[n_ref:])


def read_split(path: str | Path, defect_type: str | None = None) -> Split:
    """Read a ``split.json`` written by `Split.save`, or one type's split of a per-object run's
    (`ObjectSplit.save`; `defect_type` names the type)."""
    path = Path(path)
    if not path.is_file():
        raise DefectFillError(f"{path}: split file not found; is this a defectfill run folder?")
    try:
        data = json.loads(path.read_text())
        moved = data.get("data_root_from_split") if isinstance(data, dict) else None
        if isinstance(data, dict) and data.get("per_object"):
            types = list(data["types"])
            # any spelling the layout accepts (VisA: the name with spaces)
            defect_type = find_type(defect_type, types) or defect_type
            if defect_type not in data["types"]:
                asked = "no defect type named" if defect_type is None else f"{defect_type!r} is not one of them"
                raise DefectFillError(f"{path}: the split of a model trained on several defect types "
                                      f"({', '.join(types)}); {asked}. Name one with --defect-type.")
            data = data["types"][defect_type]
        root = Path(data["data_root"])
        if isinstance(moved, str) and (path.parent / moved).is_dir():
            root = path.parent / moved  # relative to the split file: found after the run and the data moved
        rule = data.get("mask_rule", "half")  # split files written before VisA have no rule: all were "half"
        if rule not in MASK_RULES:
            raise ValueError(f"unknown mask_rule {rule!r}")

        def samples(rows: list[dict]) -> list[DefectSample]:
            # every file stays inside the dataset root: an edited split must not point reads elsewhere
            return [
                DefectSample(contained(root, r["image"], path),
                             contained(root, r["mask"], path) if r["mask"] else None, data["defect_type"], rule)
                for r in rows
            ]

        return Split(
            data["layout"], root, data["category"], data["defect_type"],
            samples(data["reference"]), samples(data["held_out"]), samples(data.get("skipped_empty_masks", [])),
            samples(data.get("left_out_multi_type", [])),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DefectFillError(f"{path}: not a valid split file ({exc}).") from None


EMPTY_FIX = ("Draw the defect in the mask (any non-zero value or colour on black), or move the image to the "
             "defect-free images if it shows no defect.")


def sample_problem(sample: DefectSample) -> tuple[str, str | None]:
    """What is wrong with one defect sample, without raising: (kind, message).

    kind is "ok", "empty" (an all-zero mask: skipped), "no_mask", "missing_image", "missing_mask",
    "size" (mask and image differ in size) or "unreadable"; message is None for "ok".
    """
    if not sample.image.is_file():
        return "missing_image", f"{sample.image}: defect image not found (the dataset's listing names it)."
    if sample.mask is None:
        return "no_mask", (f"{sample.image}: defect image has no mask. Add <stem>_mask.png to the mask folder "
                           "of this defect type, or remove the image.")
    if not mask_file(sample.mask).is_file():
        return "missing_mask", (f"{mask_file(sample.mask)}: mask file not found; it is named as the mask of "
                                f"{sample.image.name} (VisA: in the category's image_anno.csv; an annotation export: "
                                "its annotation file). Restore the file or correct that row.")
    try:  # decoded, not only its header: a truncated file is reported here, not half-way through training
        with open_image(sample.image) as im:
            size = im.size
    except DefectFillError as exc:
        return "unreadable", str(exc)
    try:
        mask = load_mask(sample.mask, sample.mask_rule)
    except DefectFillError as exc:
        return "unreadable", str(exc)
    if (mask.shape[1], mask.shape[0]) != size:
        return "size", (f"{sample.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {sample.image.name} "
                        f"is {size[0]}x{size[1]}. Save the mask at the image's size.")
    if not np.any(mask):
        return "empty", f"{sample.mask}: mask is empty (no defect pixels); skipping this image. {EMPTY_FIX}"
    return "ok", None


def check_sample(sample: DefectSample) -> bool:
    """Raise a clear error for a missing or mis-sized mask; return False for an all-zero mask."""
    kind, message = sample_problem(sample)
    if kind not in ("ok", "empty"):
        raise DefectFillError(message)
    return kind == "ok"


def divide(kept: list[DefectSample]) -> tuple[list[DefectSample], list[DefectSample]]:
    """(reference, held out): sorted by file name, the first third (at least one) and the rest."""
    kept = sorted(kept, key=lambda s: s.image.name)
    n_ref = max(1, len(kept) // 3) if kept else 0
    return kept[:n_ref], kept[n_ref:]


def make_split(layout: Layout, category: str, defect_type: str) -> Split:
    """Validate every sample of the defect type and split it deterministically."""
    samples = layout.defect_samples(category, defect_type)
    defect_type = layout.canonical_defect_type(category, defect_type)
    multi = layout.multi_type_samples(category, defect_type)
    if multi:
        log.info("%s/%s: %d image(s) also show other defect types; left out of this single-type training: %s",
                 category, defect_type, len(multi), ", ".join(s.image.name for s in multi))
    if not samples:
        raise DefectFillError(f"{layout.root}: no images of defect type {defect_type!r} in category {category!r}.")
    kept, empty = [], []
    for sample in samples:
        try:
            ok = check_sample(sample)
        except DefectFillError:
            raise
        except OSError as exc:
            raise DefectFillError(f"{sample.image}: cannot read this file as an image ({exc}).") from None
        if ok:
            kept.append(sample)
        else:
            log.warning("%s: mask is empty (no defect pixels); skipping this image.", sample.mask)
            empty.append(sample)
    if not kept:
        raise DefectFillError(
            f"{layout.root}: every mask of defect type {defect_type!r} in {category!r} is empty; "
            f"nothing to train on. {EMPTY_FIX} `defectfill data --data {layout.root}` lists each file."
        )
    reference, held_out = divide(kept)
    return Split(layout.name, layout.root, category, defect_type, reference, held_out, empty, multi)
