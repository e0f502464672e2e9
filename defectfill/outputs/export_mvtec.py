"""`export --to mvtec`: an MVTec AD tree of the generated images under prefixed names, ready to merge into
the real dataset (anomalib's MVTec datamodule, or defectfill's own `mvtec` layout, read it).

    mvtec/<category>/test/<type>/<prefix><category>_<type>_<stem>.png
    mvtec/<category>/ground_truth/<type>/<prefix><category>_<type>_<stem>_mask.png
    mvtec/manifest.jsonl     each exported file with its provenance

Copied into the real ``<category>/`` folders, no name is taken twice: the real files are ``000.png``, ...
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from defectfill.core.atomic import write_text
from defectfill.data.images import load_mask, save_mask
from defectfill.outputs.export import ExportItem


def write(items: list[ExportItem], folder: Path) -> None:
    lines = []
    for item in items:
        image = Path(item.category) / "test" / item.defect_type / f"{item.name}{item.image.suffix}"
        mask = Path(item.category) / "ground_truth" / item.defect_type / f"{item.name}_mask.png"
        (folder / image).parent.mkdir(parents=True, exist_ok=True)
        (folder / mask).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(item.image, folder / image)
        save_mask(load_mask(item.mask), folder / mask)
        lines.append(json.dumps({"image": image.as_posix(), "mask": mask.as_posix(), **item.provenance}))
    write_text(folder / "manifest.jsonl", "".join(line + "\n" for line in lines))
