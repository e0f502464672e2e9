"""`export --to hf`: a Hugging Face `imagefolder` with `metadata.jsonl`.

    hf/train/images/<prefix><category>_<type>_<stem>.png
    hf/train/masks/<prefix><category>_<type>_<stem>_mask.png
    hf/train/metadata.jsonl     {"file_name", "mask_file_name", "category", "type", "provenance"}

``datasets.load_dataset("imagefolder", data_dir="hf")`` loads it as a ``train`` split with the columns
``image`` and ``mask`` (imagefolder decodes ``file_name`` and every ``<name>_file_name`` column as an image),
``category``, ``type`` and ``provenance`` (the manifest row as a JSON string, so rows of different runs share
one schema). The split folder is named so the metadata file is read (a metadata file at the top of
``data_dir`` is also read, but one split folder is what every datasets release handles alike).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from defectfill.core.atomic import write_text
from defectfill.data.images import load_mask, save_mask
from defectfill.outputs.export import ExportItem

SPLIT = "train"


def write(items: list[ExportItem], folder: Path) -> None:
    split = folder / SPLIT
    (split / "images").mkdir(parents=True)
    (split / "masks").mkdir()
    lines = []
    for item in items:
        image = Path("images") / f"{item.name}{item.image.suffix}"
        mask = Path("masks") / f"{item.name}_mask.png"
        shutil.copyfile(item.image, split / image)
        save_mask(load_mask(item.mask), split / mask)  # 0/255, whatever the source held
        lines.append(json.dumps({"file_name": image.as_posix(), "mask_file_name": mask.as_posix(),
                                 "category": item.category, "type": item.defect_type,
                                 "provenance": json.dumps(item.provenance, sort_keys=True)}))
    write_text(split / "metadata.jsonl", "".join(line + "\n" for line in lines))
