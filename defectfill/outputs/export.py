"""`defectfill export`: a generated dataset in the formats other tools read (COCO, a Hugging Face imagefolder,
Label Studio tasks, an MVTec AD tree), and `run --export`.

Any generated folder is accepted: a `defectfill generate` output (its manifest gives each image's provenance),
a `defectfill run` folder (every ``generated/<category>-<type>/``), or a bare MVTec-layout tree such as a run's
``synth/`` (no provenance). Each format is written by its own module (`export_coco`, `export_hf`,
`export_labelstudio`, `export_mvtec`) into ``<output>/<format>/``, built in a temporary folder that replaces
the old one only when complete. Every exported file is named ``<prefix><category>_<type>_<stem>`` (prefix
``synth_`` by default), so merged with the real dataset, whose files are ``000.png``, ``001.png``, ...,
a synthetic file never takes a real one's name.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from defectfill.config.stages import EXPORT_FORMATS
from defectfill.core.atomic import replace_dir
from defectfill.core.errors import DefectFillError
from defectfill.core.folders import check_plain_name, claim_folder, folder_lock
from defectfill.data.images import is_image_file
from defectfill.outputs.generated import STATE, OutputFolder

FORMATS = {name: f"defectfill.outputs.export_{name}" for name in EXPORT_FORMATS}  # each format's writer module
DEFAULT_PREFIX = "synth_"


@dataclass
class ExportItem:
    """One generated image: its files, its types (several when several defects were painted), provenance."""

    category: str
    defect_type: str
    image: Path
    mask: Path
    name: str  # the exported stem: <prefix><category>_<type>_<stem>, unique in the export
    defects: list[tuple[str, Path]] = field(default_factory=list)  # (type, its own mask) per painted defect
    provenance: dict[str, Any] = field(default_factory=dict)


def parse_formats(text: str | None) -> list[str]:
    """`coco,hf` -> ["coco", "hf"], each one of FORMATS; refused with the choices named."""
    names = [n.strip().lower() for n in (text or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in FORMATS]
    if unknown or not names:
        raise DefectFillError(f"--to/--export {text!r}: choose one or more of {', '.join(FORMATS)}, joined by commas "
                              "(e.g. coco,hf).")
    return list(dict.fromkeys(names))


def check_prefix(prefix: str) -> None:
    if prefix and not re.fullmatch(r"[A-Za-z0-9._-]+", prefix):
        raise DefectFillError(f"--prefix {prefix!r}: use letters, digits, '.', '_' or '-' only (it starts file "
                              "names).")


def _generated_items(root: Path, prefix: str) -> list[ExportItem]:
    """The finished items of one `defectfill generate` output, with their manifest rows as provenance."""
    try:
        state = json.loads((root / STATE).read_text())
    except (OSError, ValueError):
        state = {}
    out = OutputFolder(root, "", "", 1)
    items = []
    for _, row in sorted(out.finished().items()):
        image, mask = root / row["image"], root / row["mask"]
        parts = Path(row["image"]).parts
        if len(parts) < 4:
            continue
        category, defect_type = parts[0], parts[2]
        for name, what in ((category, "category"), (defect_type, "defect type")):
            check_plain_name(name, what, str(root / "manifest.jsonl"))
        defects = [(d["defect_type"], root / d["mask"]) for d in row.get("defects", [])
                   if isinstance(d, dict) and d.get("mask") and (root / d["mask"]).is_file()]
        provenance = {k: v for k, v in row.items() if k not in ("image", "mask", "defects")}
        if row.get("defects"):
            provenance["defects"] = [{k: v for k, v in d.items() if k != "mask"} for d in row["defects"]]
        provenance.update({"generated": str(root.resolve()), "file": row["image"],
                           "run": state.get("run"), "run_config_sha256": state.get("run_config_sha256")})
        items.append(ExportItem(category, defect_type, image, mask, f"{prefix}{category}_{defect_type}_{image.stem}",
                                defects or [(defect_type, mask)], provenance))
    return items


def _tree_items(root: Path, prefix: str) -> list[ExportItem]:
    """An MVTec-layout tree without a manifest (a run's synth/): <cat>/test/<type>/x.png + ground_truth masks."""
    items = []
    for cat in sorted(p for p in root.iterdir() if p.is_dir() and (p / "test").is_dir()):
        for type_dir in sorted(p for p in (cat / "test").iterdir() if p.is_dir() and p.name != "good"):
            for image in sorted(p for p in type_dir.iterdir() if is_image_file(p)):
                mask = cat / "ground_truth" / type_dir.name / f"{image.stem}_mask.png"
                if mask.is_file():
                    items.append(ExportItem(cat.name, type_dir.name, image, mask,
                                            f"{prefix}{cat.name}_{type_dir.name}_{image.stem}",
                                            [(type_dir.name, mask)], {"file": str(image.relative_to(root))}))
    return items


def read_items(folder: str | Path, prefix: str = DEFAULT_PREFIX) -> list[ExportItem]:
    """Every generated image of `folder` (a generate output, a run folder, or an MVTec tree)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DefectFillError(f"--generated {root}: folder not found. Name a `defectfill generate` output, a "
                              "`defectfill run` folder or its synth/.")
    if (root / STATE).is_file():
        items = _generated_items(root, prefix)
    elif (root / "generated").is_dir():
        items = [i for g in sorted((root / "generated").iterdir()) if (g / STATE).is_file()
                 for i in _generated_items(g, prefix)]
    else:
        items = _tree_items(root, prefix)
    if not items:
        raise DefectFillError(f"--generated {root}: no generated images found (a generate output's manifest.jsonl, "
                              "a run's generated/*/, or <category>/test/<type>/ with ground_truth masks).")
    names = [i.name for i in items]
    if len(set(names)) != len(names):
        raise DefectFillError(f"--generated {root}: two images would be exported as {names[0]!r}; export the "
                              "generated folders one at a time, each with its own --prefix.")
    return items


def export(generated: str | Path, output: str | Path, formats: list[str], prefix: str = DEFAULT_PREFIX
           ) -> dict[str, Path]:
    """Write each format into <output>/<format>/ (complete, or not at all); returns the folders."""
    check_prefix(prefix)
    items = read_items(generated, prefix)
    out = claim_folder(output, "export")
    written = {}
    with folder_lock(out, "export"):
        for name in formats:
            tmp = out / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            try:
                importlib.import_module(FORMATS[name]).write(items, tmp)
                replace_dir(tmp, out / name)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            written[name] = out / name
    return written


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--generated", required=True, help="a generate output, a run folder, or an MVTec-layout tree (synth/)")
    p.add_argument("--to", required=True, help=f"format(s), comma-separated: {', '.join(FORMATS)}")
    p.add_argument("--output", required=True, help="folder to write; each format goes into <output>/<format>/")
    p.add_argument("--prefix", default=DEFAULT_PREFIX,
                   help="start of every exported file name, so synthetic files never collide with real ones "
                        f"(default {DEFAULT_PREFIX!r}; '' for none)")


def export_command(args: argparse.Namespace) -> int:
    formats = parse_formats(args.to)
    written = export(args.generated, args.output, formats, args.prefix)
    for name, folder in written.items():
        print(f"{name}: {folder}")
    return 0
