"""The one place that knows each dataset's folder structure.

A layout lists categories, defect types, (image, mask) pairs of one defect type
and the defect-free images of a category. Five dataset layouts are here, and four
annotation exports in a module each (``coco``, ``yolo``, ``cvat``, ``labelstudio``:
`labelled.LabelledLayout`), all in the one registry `LAYOUTS`:

- ``mvtec``: MVTec AD, ``<cat>/train/good``, ``<cat>/test/<type>/NNN.png``,
  ``<cat>/ground_truth/<type>/NNN_mask.png`` (``test/good`` has no masks);
- ``defectfill2``: ``<cat>/train/good``, ``<cat>/train/defective/<type>/<stem>.png``,
  ``<cat>/train/defective_masks/<type>/<stem>_mask.png``;
- ``folder``: ``<root>/images/*`` with ``<root>/masks/<stem>_mask.png`` (or the
  same name), one defect type, and optional ``<root>/good/`` defect-free images;
- ``visa``: VisA as released, ``<cat>/Data/Images/{Normal,Anomaly}/*.JPG``,
  ``<cat>/Data/Masks/Anomaly/*.png`` and ``<cat>/image_anno.csv`` naming each image's
  defect types and mask (see `VisALayout`);
- ``mvtec_ad2``: MVTec AD 2, ``<cat>/train/good``, ``<cat>/validation/good``,
  ``<cat>/test_public/{good,bad}``, ``<cat>/test_public/ground_truth/bad/<stem>_mask.png``;
  one defect type, ``bad``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from defectfill.core.errors import DefectFillError
from defectfill.core.folders import contained
from defectfill.data.images import is_image_file


@dataclass(frozen=True)
class DefectSample:
    """One defect image and its mask file (None when the mask is missing).

    `mask_rule` says how its mask file is read (`images.load_mask`): "auto" (half of the range, or any
    label when nothing reaches it: class ids, dark label colours) or "nonzero" (VisA's instance-id masks).
    `mask` may be a mask reference (`data.annotations`): a mask drawn from an annotation file."""

    image: Path
    mask: Path | None
    defect_type: str
    mask_rule: str = "auto"


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
    mask_rule = "auto"  # how this layout's masks are read (`images.load_mask`)

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

    def canonical_defect_type(self, category: str, defect_type: str) -> str:
        """The layout's own spelling of a defect type the user named (VisA: spaces become underscores)."""
        return defect_type

    def multi_type_samples(self, category: str, defect_type: str) -> list[DefectSample]:
        """Images that show this defect type together with others: left out of a single-type training."""
        return []

    def multi_type_images(self, category: str) -> list[tuple[DefectSample, tuple[str, ...]]]:
        """Every image labelled with several defect types, with its types (VisA); other layouts have none."""
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


def type_key(name: str) -> str:
    """A VisA defect type as folders and the command line use it: words joined by underscores
    ("chunk of wax missing" and "chunk_of_wax_missing" both give "chunk_of_wax_missing")."""
    return "_".join(name.replace("_", " ").split())


def find_type(asked: str | None, types: Iterable[str]) -> str | None:
    """The one of `types` that `asked` names in any spelling `type_key` accepts (VisA: with spaces), or None."""
    if asked is None:
        return None
    return next((t for t in types if type_key(t) == type_key(asked)), None)


@dataclass(frozen=True)
class AnnotatedImage:
    """One row of a VisA ``image_anno.csv``: an image, its defect types (none: normal) and its mask."""

    image: Path
    types: tuple[str, ...]
    mask: Path | None
    row: int  # line number in the file, for messages


class VisALayout(Layout):
    """VisA as released (github.com/amazon-science/spot-diff, and anomalib's VisA loader, which read it).

    What those sources show: every category folder holds ``Data/Images/Normal/*.JPG``,
    ``Data/Images/Anomaly/*.JPG``, ``Data/Masks/Anomaly/*.png`` and ``image_anno.csv`` with the columns
    ``image,label,mask``; its paths are relative to the dataset root (``candle/Data/Images/Anomaly/000.JPG``),
    the label is ``normal`` or one or more defect names joined by commas (a quoted field, e.g.
    ``"weird candle wick, chunk of wax missing"``; names hold spaces), and the mask column is empty for normal
    images. ``<root>/split_csv/`` holds ``1cls.csv``, ``2cls_fewshot.csv`` and ``2cls_highshot.csv`` with the
    columns ``object,split,label,image,mask`` (split ``train``/``test``, label ``normal``/``anomaly``, paths
    relative to the root). Masks store instance ids (1, 2, ...) where the defect is, 0 elsewhere; the
    reference preparation sets every non-zero pixel to 255, so this layout reads masks as non-zero = defect.

    Defect types are the label's names in `type_key` form (underscores for spaces), which also name run
    folders; the name as written is accepted too. An image labelled with several types is left out of a
    single-type training (`multi_type_samples`). Good images: the ``normal`` rows; when
    ``split_csv/1cls.csv`` lists the category, its ``train`` normals are `good_images` and its ``test``
    normals `good_test_images` (so the two never overlap); without it every normal image is a good image.
    """

    name = "visa"
    mask_rule = "nonzero"
    ANNOTATIONS = "image_anno.csv"
    SPLIT_FILE = Path("split_csv") / "1cls.csv"

    def __init__(self, root: str | Path):
        super().__init__(root)
        self._annotations: dict[str, list[AnnotatedImage]] = {}
        self._one_class: dict[str, dict[str, list[Path]]] | None = None

    @classmethod
    def matches(cls, root: Path) -> bool:
        return any(cls._is_category(root / c) for c in _subdirs(root))

    @staticmethod
    def _is_category(folder: Path) -> bool:
        return (folder / VisALayout.ANNOTATIONS).is_file() or (folder / "Data" / "Images").is_dir()

    def categories(self) -> list[str]:
        return [c for c in _subdirs(self.root) if self._is_category(self.root / c)]

    def _resolve(self, category: str, relative: str, csv_path: Path, row: int) -> Path:
        """A path of the file: relative to the root (as released), else to the category folder."""
        where = f"{csv_path} line {row}"
        path = contained(self.root, relative, where)
        if not path.exists():
            inside = contained(self.root / category, relative, where)
            if inside.exists():
                return inside
        return path

    def annotations(self, category: str) -> list[AnnotatedImage]:
        """The rows of ``<category>/image_anno.csv``, read once."""
        if category in self._annotations:
            return self._annotations[category]
        self.check_category(category)
        csv_path = self.root / category / self.ANNOTATIONS
        if not csv_path.is_file():
            raise DefectFillError(
                f"{csv_path}: not found. A VisA category needs its image_anno.csv (columns image,label,mask: each "
                f"image, 'normal' or its defect types, its mask), as the dataset is released."
            )
        rows: list[AnnotatedImage] = []
        seen: dict[str, int] = {}  # each image's first line
        try:
            with csv_path.open(newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                columns = [c.strip() for c in reader.fieldnames or []]
                missing = [c for c in ("image", "label", "mask") if c not in columns]
                if missing:
                    raise DefectFillError(
                        f"{csv_path}: no column {', '.join(missing)}; expected the columns image,label,mask "
                        f"(found: {', '.join(columns) or 'none'})."
                    )
                for number, raw in enumerate(reader, start=2):
                    record = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if isinstance(v, str)}
                    if not record.get("image"):
                        continue
                    label = record.get("label", "")
                    names = [] if label.lower() == "normal" else [type_key(t) for t in label.split(",") if t.strip()]
                    if label.lower() != "normal" and not names:
                        raise DefectFillError(f"{csv_path} line {number}: empty label for {record['image']}; "
                                              "write 'normal' or the defect type(s).")
                    image = self._resolve(category, record["image"], csv_path, number)
                    mask = self._resolve(category, record["mask"], csv_path, number) if record.get("mask") else None
                    _listed_once(seen, image, record["image"], csv_path, number)
                    rows.append(AnnotatedImage(image, tuple(dict.fromkeys(names)), mask, number))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise DefectFillError(f"{csv_path}: cannot read this file as a CSV table ({exc}).") from None
        self._annotations[category] = rows
        return rows

    def _defect_rows(self, category: str) -> list[AnnotatedImage]:
        return [r for r in self.annotations(category) if r.types]

    def all_defect_types(self, category: str) -> list[str]:
        """Every type named in the labels, including those only on multi-type images."""
        return sorted({t for r in self._defect_rows(category) for t in r.types})

    def defect_types(self, category: str) -> list[str]:
        """Types with at least one image labelled with that type alone (what a single-type training needs)."""
        return sorted({r.types[0] for r in self._defect_rows(category) if len(r.types) == 1})

    def canonical_defect_type(self, category: str, defect_type: str) -> str:
        return type_key(defect_type)

    def check_defect_type(self, category: str, defect_type: str) -> None:
        self.check_category(category)
        key = type_key(defect_type)
        found = self.defect_types(category)
        if key in found:
            return
        multi = self.multi_type_samples(category, key)
        if multi:
            raise DefectFillError(
                f"{self.root / category / self.ANNOTATIONS}: defect type {defect_type!r} appears only on images "
                f"labelled with several types ({len(multi)}: {', '.join(s.image.name for s in multi[:5])}"
                f"{', ...' if len(multi) > 5 else ''}); a single-type training needs images of this type alone. "
                f"Defect types with images of their own: {', '.join(found) or 'none'}."
            )
        raise DefectFillError(
            f"{self.root / category}: unknown defect type {defect_type!r}. "
            f"Defect types found: {', '.join(found) or 'none'}."
        )

    def defect_samples(self, category: str, defect_type: str) -> list[DefectSample]:
        self.check_defect_type(category, defect_type)
        key = type_key(defect_type)
        return [DefectSample(r.image, r.mask, key, self.mask_rule)
                for r in self._defect_rows(category) if r.types == (key,)]

    def multi_type_samples(self, category: str, defect_type: str) -> list[DefectSample]:
        key = type_key(defect_type)
        return [DefectSample(r.image, r.mask, key, self.mask_rule)
                for r in self._defect_rows(category) if len(r.types) > 1 and key in r.types]

    def multi_type_images(self, category: str) -> list[tuple[DefectSample, tuple[str, ...]]]:
        return [(DefectSample(r.image, r.mask, "+".join(r.types), self.mask_rule), r.types)
                for r in self._defect_rows(category) if len(r.types) > 1]

    def _one_class_split(self) -> dict[str, dict[str, list[Path]]]:
        """``split_csv/1cls.csv``'s normal images: {category: {"train": [...], "test": [...]}}; {} without it."""
        if self._one_class is None:
            self._one_class = {}
            path = self.root / self.SPLIT_FILE
            if path.is_file():
                try:
                    seen: dict[str, int] = {}
                    with path.open(newline="", encoding="utf-8-sig") as f:
                        for number, row in enumerate(csv.DictReader(f), start=2):
                            row = {(k or "").strip(): (v or "").strip() for k, v in row.items() if isinstance(v, str)}
                            if row.get("label") != "normal" or row.get("split") not in ("train", "test"):
                                continue
                            cat = row.get("object", "")
                            image = self._resolve(cat, row.get("image", ""), path, number)
                            # listed in train and test, the image would be a reference and held out at once
                            _listed_once(seen, image, row.get("image", ""), path, number)
                            self._one_class.setdefault(cat, {"train": [], "test": []})[row["split"]].append(image)
                except (OSError, UnicodeDecodeError, csv.Error) as exc:
                    raise DefectFillError(f"{path}: cannot read this file as a CSV table ({exc}).") from None
        return self._one_class

    def _normals(self, category: str) -> list[Path]:
        return sorted(r.image for r in self.annotations(category) if not r.types)

    def good_images(self, category: str) -> list[Path]:
        split = self._one_class_split().get(category)
        if split and split["train"]:
            return sorted(split["train"])
        return self._normals(category)

    def good_test_images(self, category: str) -> list[Path]:
        split = self._one_class_split().get(category)
        return sorted(split["test"]) if split and split["train"] else []


def _listed_once(seen: dict[str, int], image: Path, name: str, csv_path: Path, number: int) -> None:
    """Refuse an image a CSV lists a second time (`seen`: each image's first line, updated): it would be drawn
    into both the references and the held-out set (an evaluation leak), or be both normal and defective."""
    key = os.path.normcase(os.path.normpath(os.path.abspath(image)))
    if key in seen:
        raise DefectFillError(f"{csv_path} line {number}: {name} is listed again (first on line {seen[key]}); "
                              "list each image once.")
    seen[key] = number


class MVTecAD2Layout(Layout):
    """MVTec AD 2 as released (anomalib's MVTec AD 2 loader reads it so): ``<cat>/train/good``,
    ``<cat>/validation/good``, ``<cat>/test_public/{good,bad}`` and the masks of the bad images in
    ``<cat>/test_public/ground_truth/bad`` named ``<image stem>_mask.png`` (images are named like
    ``000_regular.png``, the stem ending in the lighting condition). ``test_private`` and
    ``test_private_mixed`` have no ground truth and are not read. One defect type: ``bad``."""

    name = "mvtec_ad2"
    DEFECT_TYPE = "bad"

    @classmethod
    def matches(cls, root: Path) -> bool:
        return any((root / c / "test_public").is_dir() for c in _subdirs(root))

    def categories(self) -> list[str]:
        return [c for c in _subdirs(self.root) if (self.root / c / "test_public").is_dir()]

    def defect_types(self, category: str) -> list[str]:
        return [self.DEFECT_TYPE] if (self.root / category / "test_public" / self.DEFECT_TYPE).is_dir() else []

    def defect_samples(self, category: str, defect_type: str) -> list[DefectSample]:
        self.check_defect_type(category, defect_type)
        public = self.root / category / "test_public"
        masks = _masks_by_stem(public / "ground_truth" / defect_type)
        return [DefectSample(p, _find_mask(masks, p.stem), defect_type) for p in _images(public / defect_type)]

    def good_images(self, category: str) -> list[Path]:
        return _images(self.root / category / "train" / "good")

    def good_test_images(self, category: str) -> list[Path]:
        return _images(self.root / category / "test_public" / "good")


# The annotation exports (one module each, over `labelled.LabelledLayout`); imported here, after `Layout`, so
# this module's registry is the one list of layouts. They import this module, which is complete by then.
from defectfill.data.coco import COCOLayout  # noqa: E402
from defectfill.data.cvat import CVATMaskLayout  # noqa: E402
from defectfill.data.labelstudio import LabelStudioLayout  # noqa: E402
from defectfill.data.yolo import YOLOLayout  # noqa: E402

LAYOUTS: dict[str, type[Layout]] = {
    "mvtec": MVTecLayout,
    "defectfill2": DefectFill2Layout,
    "visa": VisALayout,
    "mvtec_ad2": MVTecAD2Layout,
    "coco": COCOLayout,
    "yolo": YOLOLayout,
    "cvat": CVATMaskLayout,
    "labelstudio": LabelStudioLayout,
    "folder": FolderLayout,
}


def open_layout(root: str | Path, layout: str = "auto", good: str | Path | None = None) -> Layout:
    """Open a dataset root with the named layout, or detect it with ``auto``. `good` (`--good-images`): the
    folder of defect-free images, for the annotation exports (coco, yolo, cvat, labelstudio)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DefectFillError(f"{root}: data folder not found. Pass --data the dataset root folder.")
    if layout != "auto":
        if layout not in LAYOUTS:
            raise DefectFillError(f"unknown layout {layout!r}; choose one of auto, {', '.join(LAYOUTS)}.")
        return _construct(LAYOUTS[layout], root, good)
    for cls in LAYOUTS.values():
        if cls.matches(root):
            return _construct(cls, root, good)
    hint = ""
    if (root / "test").is_dir() and (root / "ground_truth").is_dir():
        hint = f" It looks like one MVTec category: pass --data {root.parent} --category {root.name}."
    elif VisALayout._is_category(root):
        hint = f" It looks like one VisA category: pass --data {root.parent} --category {root.name}."
    elif (root / "test_public").is_dir():
        hint = f" It looks like one MVTec AD 2 category: pass --data {root.parent} --category {root.name}."
    elif (root / "images").is_dir():
        hint = (" It has images/ but no masks/, labels/ or annotations/: add the masks (masks/<stem>_mask.png), "
                "or the annotation export next to images/.")
    raise DefectFillError(
        f"{root}: cannot tell the dataset layout. Expected MVTec AD (<cat>/test, <cat>/ground_truth), "
        f"DefectFill2 (<cat>/train/defective), VisA (<cat>/Data/Images, <cat>/image_anno.csv), "
        f"MVTec AD 2 (<cat>/test_public), COCO (images/, annotations/*.json), YOLO segmentation (images/, labels/, "
        f"data.yaml), CVAT segmentation masks (SegmentationClass/, labelmap.txt), a Label Studio JSON export "
        f"(<export>.json with the images) or a plain folder (images/ and masks/).{hint}"
    )


def _construct(cls: type[Layout], root: Path, good: str | Path | None) -> Layout:
    if getattr(cls, "takes_good", False):
        return cls(root, good=good)
    if good:
        raise DefectFillError(f"--good-images is for the annotation exports (coco, yolo, cvat, labelstudio); the "
                              f"{cls.name} layout has its own defect-free images. Leave --good-images out.")
    return cls(root)


def object_name(category: str) -> str:
    """The object's name for prompts: ``metal_nut`` -> ``metal nut``."""
    return category.replace("_", " ").replace("-", " ").strip()
