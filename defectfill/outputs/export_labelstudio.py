"""`export --to labelstudio`: Label Studio tasks with each generated mask as a prediction, for review in the
tool people already label with.

    labelstudio/images/<prefix><category>_<type>_<stem>.png
    labelstudio/tasks.json          [{"data": {"image": ...}, "predictions": [{"result": [brush mask]}]}]
    labelstudio/label_config.xml    <Image name="image"> + <BrushLabels name="tag"> with one label per type

Import ``tasks.json`` into a project whose labeling interface is ``label_config.xml``; each task opens with
the generated mask pre-drawn as a brush region (a prediction, ``model_version`` "defectfill") that a reviewer
accepts, corrects or rejects. The mask is Label Studio's brush RLE (`data.annotations.encode_brush_rle`),
``original_width``/``original_height`` in pixels. Images are referenced as local files
(``/data/local-files/?d=images/<name>``): start Label Studio with
``LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true`` and ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT`` set to this
folder, and add a local storage for it (or upload the images and keep the tasks). The task's ``data`` also
holds the category, type and the manifest's provenance (as JSON).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from xml.sax.saxutils import quoteattr

from defectfill.core.atomic import write_json, write_text
from defectfill.data.annotations import encode_brush_rle
from defectfill.data.images import load_mask
from defectfill.outputs.export import ExportItem

FROM_NAME, TO_NAME = "tag", "image"
MODEL_VERSION = "defectfill"


def label_config(types: list[str]) -> str:
    labels = "\n".join(f"    <Label value={quoteattr(t)}/>" for t in types)
    return (f'<View>\n  <Image name="{TO_NAME}" value="$image" zoom="true"/>\n'
            f'  <BrushLabels name="{FROM_NAME}" toName="{TO_NAME}">\n{labels}\n  </BrushLabels>\n</View>\n')


def write(items: list[ExportItem], folder: Path) -> None:
    (folder / "images").mkdir(parents=True)
    tasks = []
    for item in items:
        name = f"{item.name}{item.image.suffix}"
        shutil.copyfile(item.image, folder / "images" / name)
        result = []
        for k, (t, mask_path) in enumerate(item.defects):
            mask = load_mask(mask_path)
            result.append({"id": f"{item.name}-{k}", "type": "brushlabels", "from_name": FROM_NAME, "to_name": TO_NAME,
                           "original_width": int(mask.shape[1]), "original_height": int(mask.shape[0]),
                           "image_rotation": 0,
                           "value": {"format": "rle", "rle": encode_brush_rle(mask), "brushlabels": [t]}})
        scores = item.provenance.get("scores") or []
        chosen = item.provenance.get("chosen")
        prediction = {"model_version": MODEL_VERSION, "result": result}
        if isinstance(chosen, int) and 0 <= chosen < len(scores):
            prediction["score"] = float(scores[chosen])  # the Low-Fidelity Selection score of the kept candidate
        tasks.append({"data": {"image": f"/data/local-files/?d=images/{name}", "category": item.category,
                               "type": item.defect_type, "provenance": json.dumps(item.provenance, sort_keys=True)},
                      "predictions": [prediction]})
    write_json(folder / "tasks.json", tasks)
    write_text(folder / "label_config.xml", label_config(sorted({t for i in items for t, _ in i.defects})))
