"""The one place that knows each dataset's folder structure.

A layout lists categories, defect types, (image, mask) pairs of one defect type
and the defect-free images of a category. Three layouts are supported:

- ``mvtec``: MVTec AD, ``<cat>/train/good``, ``<cat>/test/<type>/NNN.png``,
  ``<cat>/ground_truth/<type>/NNN_mask.png`` (``test/good`` has no masks);
- ``defectfill2``: ``<cat>/train/good``, ``<cat>/train/defective/<type>/<stem>.png``,
  ``<cat>/train/defective_masks/<type>/<stem>_mask.png``;
- ``folder``: ``<root>/images/*`` with ``<root>/masks/<stem>_mask.png`` (or the
  same name), one defect type, and optional ``<root>/good/`` defect-free images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from defectfill.data.images import is_image_file
from defectfill.errors import DefectFillError


@dataclass(frozen=True)
class DefectSample:
    """One defect image and its mask file (None when the mask is missing)."""

    image: Path
    mask: Path | None
    defect_type: str


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def _masks_by_stem(mask_dir: Path) -> dict[str, Path]:
    """Mask files of a folder by stem, listed once (the first in sorted order wins a shared stem)."""
    masks: dict[str, Path] = {}
    for p in _images(mask_dir):
        masks.setdefault(p.stem, p)
    return masks


def _find_mask(masks: dict[str, Path], stem: str) -> Path | None:
    """`<stem>_mask.*`, else `<stem>.*`."""
    return masks.get(f"{stem}_mask") or masks.get(stem)


def _subdirs(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


class Layout:
    """Base class: a dataset root with categories and defect types."""

    name = "base"

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DefectFillError(f"{self.root}: data folder not found. Pass --data the dataset root folder.")

    # Subclasses override these four.
    def categories(self) -> list[str]:
        raise NotImplementedError

    def defect_types(self, category: str) -> list[str]:
        raise NotImplementedError

    def defect_samples(self, category: str, defect_type: str) -> list[DefectSample]:
        raise NotImplementedError

    def good_images(self, category: str) -> list[Path]:
        """Defect-free training images of a category."""
        raise NotImplementedError

    def good_test_images(self, category: str) -> list[Path]:
        """Defect-free test images (for evaluating localisation); empty when the layout has none."""
        return []

    @classmethod
    def matches(cls, root: Path) -> bool:
        raise NotImplementedError

    # Shared checks with clear messages.
    def check_category(self, category: str) -> None:
        found = self.categories()
        if category not in found:
            raise DefectFillError(
                f"{self.root}: unknown category {category!r} in this {self.name} dataset. "
                f"Categories found: {', '.join(found) or 'none'}."
            )

    def check_defect_type(self, category: str, defect_type: str) -> None:
        self.check_category(category)
        found = self.defect_types(category)
        if defect_type not in found:
            raise DefectFillError(
                f"{self.root / category}: unknown defect type {defect_type!r}. "
                f"Defect types found: {', '.join(found) or 'none'}."
            )


class MVTecLayout(Layout):
    name = "mvtec"

    @classmethod
    def matches(cls, root: Path) -> bool:
        return any((root / c / "ground_truth").is_dir() and (root / c / "test").is_dir() for c in _subdirs(root))

    def categories(self) -> list[str]:
        return [c for c in _subdirs(self.root) if (self.root / c / "test").is_dir()]

    def defect_types(self, category: str) -> list[str]:
        return [t for t in _subdirs(self.root / category / "test") if t != "good"]

    def defect_samples(self, category: str, defect_type: str) -> list[DefectSample]:
        self.check_defect_type(category, defect_type)
        masks = _masks_by_stem(self.root / category / "ground_truth" / defect_type)
        return [
            DefectSample(p, _find_mask(masks, p.stem), defect_type)
            for p in _images(self.root / category / "test" / defect_type)
        ]

    def good_images(self, category: str) -> list[Path]:
        return _images(self.root / category / "train" / "good")

    def good_test_images(self, category: str) -> list[Path]:
        return _images(self.root / category / "test" / "good")


class DefectFill2Layout(Layout):
    name = "defectfill2"

    @classmethod
    def matches(cls, root: Path) -> bool:
        return any((root / c / "train" / "defective").is_dir() for c in _subdirs(root))

    def categories(self) -> list[str]:
        return [c for c in _subdirs(self.root) if (self.root / c / "train" / "defective").is_dir()]

    def defect_types(self, category: str) -> list[str]:
        return _subdirs(self.root / category / "train" / "defective")

    def defect_samples(self, category: str, defect_type: str) -> list[DefectSample]:
        self.check_defect_type(category, defect_type)
        base = self.root / category / "train"
        masks = _masks_by_stem(base / "defective_masks" / defect_type)
        return [
            DefectSample(p, _find_mask(masks, p.stem), defect_type)
            for p in _images(base / "defective" / defect_type)
        ]

    def good_images(self, category: str) -> list[Path]:
        return _images(self.root / category / "train" / "good")


class FolderLayout(Layout):
    """A plain folder: images/ + masks/ of one defect type; the category is the user's object name."""

    name = "folder"

    @classmethod
    def matches(cls, root: Path) -> bool:
        return (root / "images").is_dir() and (root / "masks").is_dir()

    def categories(self) -> list[str]:
        return []  # any category name is accepted: it only names the object in prompts

    def check_category(self, category: str) -> None:
        if not category:
            raise DefectFillError(f"{self.root}: a plain folder dataset needs --category (the object's name).")

    def defect_types(self, category: str) -> list[str]:
        return []  # any defect type name is accepted

    def check_defect_type(self, category: str, defect_type: str) -> None:
        self.check_category(category)

    def defect_samples(self, category: str, defect_type: str) -> list[DefectSample]:
        self.check_category(category)
        masks = _masks_by_stem(self.root / "masks")
        return [
            DefectSample(p, _find_mask(masks, p.stem), defect_type)
            for p in _images(self.root / "images")
        ]

    def good_images(self, category: str) -> list[Path]:
        return _images(self.root / "good")


LAYOUTS: dict[str, type[Layout]] = {
    "mvtec": MVTecLayout,
    "defectfill2": DefectFill2Layout,
    "folder": FolderLayout,
}


def open_layout(root: str | Path, layout: str = "auto") -> Layout:
    """Open a dataset root with the named layout, or detect it with ``auto``."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DefectFillError(f"{root}: data folder not found. Pass --data the dataset root folder.")
    if layout != "auto":
        if layout not in LAYOUTS:
            raise DefectFillError(f"unknown layout {layout!r}; choose one of auto, {', '.join(LAYOUTS)}.")
        return LAYOUTS[layout](root)
    for cls in LAYOUTS.values():
        if cls.matches(root):
            return cls(root)
    hint = ""
    if (root / "test").is_dir() and (root / "ground_truth").is_dir():
        hint = f" It looks like one MVTec category: pass --data {root.parent} --category {root.name}."
    raise DefectFillError(
        f"{root}: cannot tell the dataset layout. Expected MVTec AD (<cat>/test, <cat>/ground_truth), "
        f"DefectFill2 (<cat>/train/defective) or a plain folder (images/ and masks/).{hint}"
    )


def object_name(category: str) -> str:
    """The object's name for prompts: ``metal_nut`` -> ``metal nut``."""
    return category.replace("_", " ").replace("-", " ").strip()
