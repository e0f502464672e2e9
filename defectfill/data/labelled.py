"""What the annotation-export layouts share (`coco`, `yolo`, `cvat`, `labelstudio`): one object per dataset,
its labels' categories as defect types, masks drawn from the annotations.

An export is one object (a CVAT task, a Label Studio project), so like a plain folder the category is the
object's name (`--category`; `defectfill data` uses the folder's name) and every label category is a defect
type, several per dataset. Names are written as folders use them (`type_key`: spaces become underscores; the
name as written is accepted too). As with VisA, an image that shows several types is left out of a
single-type training and joins a per-object one with all its types. Defect-free images: the folder named by
`--good-images` when given, else `<root>/good/` when it exists, else every image of the export without an
annotation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from defectfill.core.errors import DefectFillError
from defectfill.data.images import is_image_file
from defectfill.data.layouts import DefectSample, Layout, type_key


@dataclass(frozen=True)
class Labelled:
    """One annotated image: its mask (a reference, `data.annotations`) for each type it shows, and for all."""

    image: Path
    masks: dict[str, Path]  # type (as `type_key` writes it) -> the mask of that type's annotations
    union: Path  # the mask of all its annotations


def folder_name(label: str) -> str:
    """A label category as a defect type: `type_key`, with path separators replaced (it names folders)."""
    name = type_key(str(label).replace("/", " ").replace("\\", " "))
    return name or "defect"


def read_label_text(path: Path, what: str = "file") -> str:
    """The text of an annotation export's text file; unreadable or not UTF-8 is a message naming the file."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DefectFillError(f"{path}: cannot read this {what} ({exc}).") from None


def all_images(folder: Path) -> list[Path]:
    """Every image file under `folder` (recursively), sorted; hidden folders skipped."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if is_image_file(p)
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


class LabelledLayout(Layout):
    """Base of the annotation-export layouts; a subclass reads its export in `read_labels`."""

    takes_good = True  # open_layout passes --good-images

    def __init__(self, root: str | Path, good: str | Path | None = None):
        super().__init__(root)
        self.good = resolve_good(self.root, good) if good else None
        self._labels: list[Labelled] | None = None
        self._listed: list[Path] = []

    # a subclass: (every annotated image, every image the export lists or holds)
    def read_labels(self) -> tuple[list[Labelled], list[Path]]:
        raise NotImplementedError

    def labels(self) -> list[Labelled]:
        if self._labels is None:
            labels, listed = self.read_labels()
            self._labels = [r for r in labels if r.masks]
            self._listed = listed
        return self._labels

    def categories(self) -> list[str]:
        return []  # one object: any category name is accepted; it names the object in prompts

    def check_category(self, category: str) -> None:
        if not category:
            raise DefectFillError(f"{self.root}: a {self.name} export is one object; pass --category (its name, "
                                  "e.g. --category bottle).")

    def all_defect_types(self, category: str) -> list[str]:
        return sorted({t for r in self.labels() for t in r.masks})

    def defect_types(self, category: str) -> list[str]:
        return sorted({next(iter(r.masks)) for r in self.labels() if len(r.masks) == 1})

    def canonical_defect_type(self, category: str, defect_type: str) -> str:
        return folder_name(defect_type)

    def check_defect_type(self, category: str, defect_type: str) -> None:
        self.check_category(category)
        key = folder_name(defect_type)
        found = self.defect_types(category)
        if key in found:
            return
        multi = self.multi_type_samples(category, key)
        extra = (f"; it appears only on images that show other types too ({', '.join(s.image.name for s in multi[:5])}), "
                 "which a single-type training leaves out (train them together: --defect-type all)") if multi else ""
        raise DefectFillError(f"{self.root}: unknown defect type {defect_type!r} in this {self.name} export{extra}. "
                              f"Defect types found: {', '.join(found) or 'none'}.")

    def defect_samples(self, category: str, defect_type: str) -> list[DefectSample]:
        self.check_defect_type(category, defect_type)
        key = folder_name(defect_type)
        return [DefectSample(r.image, r.masks[key], key, self.mask_rule)
                for r in self.labels() if list(r.masks) == [key]]

    def multi_type_samples(self, category: str, defect_type: str) -> list[DefectSample]:
        key = folder_name(defect_type)
        return [DefectSample(r.image, r.masks[key], key, self.mask_rule)
                for r in self.labels() if len(r.masks) > 1 and key in r.masks]

    def multi_type_images(self, category: str) -> list[tuple[DefectSample, tuple[str, ...]]]:
        return [(DefectSample(r.image, r.union, "+".join(sorted(r.masks)), self.mask_rule), tuple(sorted(r.masks)))
                for r in self.labels() if len(r.masks) > 1]

    def good_images(self, category: str) -> list[Path]:
        if self.good is not None:
            return all_images(self.good)
        if (self.root / "good").is_dir():
            return all_images(self.root / "good")
        annotated = {r.image for r in self.labels()}
        return sorted(p for p in dict.fromkeys(self._listed) if p not in annotated and p.is_file())


def resolve_good(root: Path, good: str | Path) -> Path:
    """`--good-images`: a folder inside the dataset (relative names are read from --data first, so the
    recorded setting survives a move), else as given (absolute, or from the working directory)."""
    given = Path(good).expanduser()
    if not given.is_absolute() and (root / given).is_dir():
        return root / given
    if given.is_dir():
        return given.absolute()
    raise DefectFillError(f"--good-images {good}: folder not found (looked in {root} and the working directory). "
                          "Name a folder of defect-free images of this object.")
