"""`defectfill data`: what a dataset holds, as `train` would read it. Reads no model and writes nothing.

For the detected (or named) layout: each category with its good images, each defect type with its counts of
images, masks, empty masks, size mismatches and images left out because they show several types (VisA), the
reference / held-out split `train` would use, and every problem found with its file named. A table for
people, `--json` for scripts. Exit status 0 when no problem was found, 1 when some were (listed), 2 when the
dataset cannot be read at all (a `DefectFillError`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from defectfill.data.images import mask_file
from defectfill.data.labelled import LabelledLayout
from defectfill.data.layouts import LAYOUTS, FolderLayout, Layout, VisALayout, open_layout
from defectfill.data.split import EMPTY_FIX, divide, relative_name, sample_problem

PROBLEM_KINDS = ("missing_image", "no_mask", "missing_mask", "size", "unreadable")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset root folder")
    p.add_argument("--category", help="only this category (a plain folder dataset: the object's name)")
    p.add_argument("--layout", default="auto", choices=["auto", *LAYOUTS], help="dataset layout")
    p.add_argument("--good-images", help="folder of defect-free images (annotation exports: coco, yolo, cvat, "
                                         "labelstudio; default: good/, else the images without annotations)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def inspect_type(layout: Layout, category: str, defect_type: str | None) -> dict[str, Any]:
    """Counts, the split `train` would make, and the problems of one defect type (nothing raised per file)."""
    multi = layout.multi_type_samples(category, defect_type) if defect_type else []
    if isinstance(layout, (VisALayout, LabelledLayout)) and defect_type not in layout.defect_types(category):
        samples = []  # the type is only on images labelled with several types
    else:
        samples = layout.defect_samples(category, defect_type or "defect")
    kept, empty, problems = [], [], []
    masks = mismatched = 0
    for sample in samples:
        kind, message = sample_problem(sample)
        if sample.mask is not None and mask_file(sample.mask).is_file():
            masks += 1
        if kind == "ok":
            kept.append(sample)
        elif kind == "empty":
            empty.append(sample)
        else:
            mismatched += kind == "size"
            problems.append({"file": str(sample.mask if kind in ("missing_mask", "size") else sample.image),
                             "kind": kind, "message": message})
    for sample in empty:
        problems.append({"file": str(sample.mask), "kind": "empty_mask",
                         "message": f"{sample.mask}: mask is empty (no defect pixels); train skips this image. "
                                    f"{EMPTY_FIX}"})
    if not samples:
        where = (layout.root if isinstance(layout, LabelledLayout) else
                 layout.root / category / (VisALayout.ANNOTATIONS if isinstance(layout, VisALayout) else ""))
        problems.append({"file": str(where), "kind": "no_images",
                         "message": f"{where}: no image shows defect type {defect_type!r} alone"
                                    + (f"; it appears only on {len(multi)} image(s) labelled with several types "
                                       f"({', '.join(s.image.name for s in multi[:5])}), which a single-type "
                                       "training leaves out." if multi else ".")})
    elif not kept and len(empty) == len(samples):
        problems.append({"file": str(layout.root / category), "kind": "all_empty",
                         "message": f"{layout.root / category}: every mask of defect type {defect_type!r} is empty; "
                                    f"nothing to train on. {EMPTY_FIX}"})
    reference, held_out = divide(kept) if not any(p["kind"] in PROBLEM_KINDS for p in problems) else ([], [])

    def rows(items):
        return [{"image": relative_name(layout.root, s.image), "mask": relative_name(layout.root, s.mask)}
                for s in items]

    return {
        "defect_type": defect_type,
        "images": len(samples),
        "masks": masks,
        "empty_masks": len(empty),
        "size_mismatches": mismatched,
        "multi_type_images": len(multi),
        "split": {"reference": rows(reference), "held_out": rows(held_out), "skipped_empty_masks": rows(empty),
                  "left_out_multi_type": rows(multi)},
        "problems": problems,
    }


def _types(layout: Layout, category: str) -> list[str | None]:
    if isinstance(layout, FolderLayout):
        return [None]  # one defect type, named by the user
    if isinstance(layout, (VisALayout, LabelledLayout)):
        return layout.all_defect_types(category)  # also those only on multi-type images: their problem is shown
    return list(layout.defect_types(category))


def inspect_dataset(root: str | Path, category: str | None = None, layout_name: str = "auto",
                    good: str | None = None) -> dict[str, Any]:
    """Everything `defectfill data` reports, as one JSON-ready dict. Raises `DefectFillError` when the
    dataset cannot be read at all (no such folder, unknown layout or category, a VisA category without
    image_anno.csv)."""
    layout = open_layout(root, layout_name, good)
    if isinstance(layout, (FolderLayout, LabelledLayout)):
        categories = [category or layout.root.name]
    elif category:
        layout.check_category(category)
        categories = [category]
    else:
        categories = layout.categories()
    report: dict[str, Any] = {"data": str(layout.root), "layout": layout.name, "mask_rule": layout.mask_rule,
                              "categories": [], "problems": []}
    if not categories:
        report["problems"].append({"file": str(layout.root), "kind": "no_categories",
                                   "message": f"{layout.root}: no categories found."})
    for cat in categories:
        entry = {"category": cat, "good_images": len(layout.good_images(cat)),
                 "good_test_images": len(layout.good_test_images(cat)), "defect_types": []}
        types = _types(layout, cat)
        if not types:
            report["problems"].append({"file": str(layout.root / cat), "kind": "no_defect_types",
                                       "message": f"{layout.root / cat}: no defect types found."})
        for t in types:
            result = inspect_type(layout, cat, t)
            entry["defect_types"].append(result)
            report["problems"] += result["problems"]
        report["categories"].append(entry)
    return report


def format_table(report: dict[str, Any]) -> str:
    rules = {"nonzero": "non-zero = defect", "half": "defect above half of the range",
             "auto": "defect above half of the range, or any non-zero label when nothing reaches it"}
    lines = [f"dataset {report['data']}: layout {report['layout']} (masks read as "
             f"{rules.get(report['mask_rule'], report['mask_rule'])})"]
    head = (f"  {'defect type':32} {'images':>6} {'masks':>5} {'empty':>5} {'size!=':>6} {'multi':>5} "
            f"{'reference':>9} {'held-out':>8}")
    for cat in report["categories"]:
        lines.append(f"category {cat['category']}: {cat['good_images']} good images"
                     + (f", {cat['good_test_images']} good test images" if cat["good_test_images"] else ""))
        lines.append(head)
        for t in cat["defect_types"]:
            split = t["split"]
            lines.append(f"  {t['defect_type'] or '(any name)':32} {t['images']:>6} {t['masks']:>5} "
                         f"{t['empty_masks']:>5} {t['size_mismatches']:>6} {t['multi_type_images']:>5} "
                         f"{len(split['reference']):>9} {len(split['held_out']):>8}")
    problems = report["problems"]
    lines.append(f"{len(problems)} problem(s)" + (":" if problems else ""))
    lines += [f"  {p['message']}" for p in problems]
    return "\n".join(lines)


def data_command(args: argparse.Namespace) -> int:
    report = inspect_dataset(args.data, args.category, args.layout, getattr(args, "good_images", None))
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    # an empty mask is a problem too: train would skip the image, and an image the user meant as a reference
    # silently missing is the mistake this command is for (class ids or dark colours once read as empty)
    return 1 if report["problems"] else 0
