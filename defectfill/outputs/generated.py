"""The generated dataset: the folder `defectfill generate` (and the browser UI's "add") writes, in the MVTec AD
layout with a manifest of the finished items.

    <output>/
      <category>/test/<type>/NNN.png                 the chosen images
      <category>/ground_truth/<type>/NNN_mask.png    their masks
      <category>/train/good/<name>                   the defect-free sources (links; --with-good)
      candidates/<category>/<type>/NNN_[dI_]C.png    every candidate (--save-candidates)
      attention/<category>/<type>/NNN[_I]_attn.png   the token's attention map (--save-attention)
      defect_masks/<category>/<type>/NNN_I_<t>_mask.png  each defect's own mask (several per image)
      manifest.jsonl (manifest.partR.jsonl while processes write)
      .writing.partR.jsonl                           the item files each process is about to write (so an item a
                                                     killed job left half-written is known as ours); gone once
                                                     the item's row is written, and cleaned when a job resumes
      generate.json                                  which run(s) and settings produced the folder
      preview.png (.preview/ while it is written)
      rejected/<the item's own paths>                items rejected in the browser UI (kept by --overwrite)

A manifest row is appended only once the item's image and mask exist, so a row always means a finished item.
Every path a row names is relative to the output folder (`../data/...` for a source outside it; rows written
before that name sources by absolute paths, and `row_file` reads both), and a row from `defectfill generate`
says what made it (`provenance`: the base model and the SHA-256 of its weights, of the LoRA file, the defectfill
version, the UTC time, the device and precision).
Only files a row (or a `.writing` row) of this folder names are ours: an item is never written over, and
--overwrite never deletes, any other file (the user's notes, rejected items, a real dataset's images).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from defectfill.config.stages import GenerateConfig
from defectfill.core.atomic import atomic_write, write_json, writing_into
from defectfill.core.errors import DefectFillError
from defectfill.core.folders import IGNORED, contained
from defectfill.data.images import open_image
from defectfill.outputs.run_folder import read_recorded_config

if TYPE_CHECKING:  # the generator's result type, for annotations only: this layer does not import generation
    from defectfill.generate.generator import GenerationResult

MANIFEST = "manifest.jsonl"
STATE = "generate.json"  # which run and settings produced this output folder
PREVIEW = "preview.png"
PREVIEW_DIR = ".preview"  # one strip per early item, stacked into preview.png at the end
REJECTED_DIR = "rejected"  # items rejected in the UI are moved here, keeping their relative paths
WRITING_GLOB = ".writing.part*.jsonl"
# the names this tool gives the files of its own sub-trees (candidates/<cat>/<type>/..., and so on): --overwrite
# removes only files of these names, at that depth
OWN_TREES = {
    "candidates": re.compile(r"\d+_(d\d+_)?\d+\.png"),
    "attention": re.compile(r"\d+(_\d+)?_attn\.png"),
    "defect_masks": re.compile(r"\d+_\d+_.+_mask\.png"),
}
PREVIEW_NAME = re.compile(r"\d{6}\.png")


def manifest_path(root: Path) -> Path:
    """The merged manifest of a generated dataset."""
    return Path(root) / MANIFEST


def manifest_count(root: Path) -> int:
    """Rows of a generated dataset's merged manifest (0 without one): how many items a finished generate wrote."""
    path = manifest_path(root)
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0


def read_manifest(root: Path) -> list[dict]:
    """The finished items' manifest rows of a generated dataset, by index ([] without one)."""
    rows = OutputFolder(Path(root), "", "", 1).finished()
    return [rows[i] for i in sorted(rows)]


def is_generated_dataset(folder: Path) -> bool:
    """Whether `defectfill generate` (or the UI) wrote `folder`: it records its settings there."""
    return (Path(folder) / STATE).is_file()


def selection_network(root: Path) -> str | None:
    """Which network Low-Fidelity Selection scored a generated dataset's candidates with (its generate.json):
    "untrained AlexNet" (--lpips-random-backbone), "AlexNet", or None when the folder does not say."""
    try:
        state = json.loads((Path(root) / STATE).read_text())
    except (OSError, ValueError):
        return None
    config = state.get("config") if isinstance(state, dict) else None
    if not isinstance(config, dict) or "lpips_random_backbone" not in config:
        return None
    return "untrained AlexNet" if config["lpips_random_backbone"] else "AlexNet"


def folder_relative(root: Path, path: str | Path) -> str:
    """How a row names a file: relative to the output folder, normalised (`../../data/x.png` for one outside it),
    so the folder and its sources can move together."""
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(root))).as_posix()


def row_file(root: Path, value: str | None) -> Path | None:
    """The file a row's path names: relative to the output folder, or absolute as rows written before were."""
    if not value or value.startswith("shape:"):
        return None
    return Path(os.path.normpath(Path(root) / value))


def generation_provenance(base_model: str, run_dirs: list[Path], device: str, precision: str) -> dict[str, Any]:
    """What a job's rows were made with (`write_item` adds each row's UTC time): the base model as named and the
    SHA-256 of its weights (None where the weights are not on this machine), the LoRA file's, the version."""
    import defectfill
    from defectfill.model.names import LORA_WEIGHTS_NAME
    from defectfill.model.provenance import file_sha256, weights_sha256

    loras = [Path(d) / LORA_WEIGHTS_NAME for d in run_dirs]
    return {"defectfill_version": defectfill.__version__, "base_model": base_model,
            "base_model_sha256": weights_sha256(base_model),
            "lora_sha256": [file_sha256(f) if f.is_file() else None for f in loras] if len(loras) > 1
            else (file_sha256(loras[0]) if loras[0].is_file() else None),
            "device": str(device), "precision": precision}


def row_mask_source(root: Path, mask_source: str) -> str:
    """A row's mask source: a mask file relative to the output folder, or a drawn shape (`shape:<name>`) as is."""
    return mask_source if mask_source.startswith("shape:") or mask_source == "drawn" else folder_relative(root, mask_source)


def stamped(provenance: dict[str, Any]) -> dict[str, Any]:
    """A job's provenance with this row's UTC time."""
    from datetime import datetime, timezone

    return {**provenance, "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def preview_path(root: Path) -> Path:
    return Path(root) / PREVIEW


def good_folder(root: Path, category: str) -> Path:
    """<category>/train/good of a generated dataset: the linked defect-free sources."""
    return Path(root) / category / "train" / "good"


def type_folders(root: Path, category: str, defect_type: str) -> list[Path]:
    """The MVTec folders of one type in a generated dataset: its images, then its masks."""
    return [Path(root) / category / sub / defect_type for sub in ("test", "ground_truth")]


def candidate_file(root: Path, category: str, defect_type: str, stem: str, c: int, step: str = "") -> Path:
    """Candidate `c` of the image named `stem` (`step`: `dI_` for defect I of several), outside the MVTec tree so
    dataset loaders never read candidates as test images."""
    return Path(root) / "candidates" / category / defect_type / f"{stem}_{step}{c}.png"


@dataclass
class Item:
    """One output image: its index, source image, mask source and seed."""

    index: int
    image: Path
    mask_source: str  # a mask file path, or "shape:<name>"
    seed: int
    mask_rule: str = "half"  # how a mask file is read: "nonzero" for VisA's held-out masks (`load_mask`)


# an item's image or mask as a journal names it: <cat>/test/<type>/NNN.png, <cat>/ground_truth/<type>/NNN_mask.png
_ITEM_FILE = re.compile(r"[^/]+/(test/[^/]+/\d+\.png|ground_truth/[^/]+/\d+_mask\.png)")


def _row_files(path: Path) -> list[str]:
    """The files the rows of a manifest part or a journal name (image, mask, attention, a journal's files, each
    defect's mask and map); lines that are not rows (a torn last line) are skipped."""
    found: list[Any] = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict):
            continue
        found += [row.get("image"), row.get("mask"), row.get("attention")]
        found += row.get("files") or [] if isinstance(row.get("files"), list) else []
        for defect in row.get("defects") or [] if isinstance(row.get("defects"), list) else []:
            if isinstance(defect, dict):
                found += [defect.get("mask"), defect.get("attention")]
    return [n for n in found if isinstance(n, str) and n]


class OutputFolder:
    """The files of one output folder: names, the finished-item manifest, the run identity."""

    def __init__(self, root: Path, category: str, defect_type: str, count: int):
        self.root = root
        self.category, self.defect_type = category, defect_type
        self.digits = max(3, len(str(max(count - 1, 0))))

    def image_path(self, index: int) -> Path:
        return self.root / self.category / "test" / self.defect_type / f"{index:0{self.digits}d}.png"

    def mask_path(self, index: int) -> Path:
        return self.root / self.category / "ground_truth" / self.defect_type / f"{index:0{self.digits}d}_mask.png"

    def candidate_path(self, index: int, c: int, defect: int | None = None) -> Path:
        step = "" if defect is None else f"d{defect}_"
        return candidate_file(self.root, self.category, self.defect_type, f"{index:0{self.digits}d}", c, step)

    def defect_mask_path(self, index: int, defect: int, defect_type: str) -> Path:
        """One defect's own mask in an image with several (outside the MVTec tree, named in the manifest)."""
        return (self.root / "defect_masks" / self.category / self.defect_type /
                f"{index:0{self.digits}d}_{defect}_{defect_type}_mask.png")

    def good_path(self, source_image: str | None) -> Path | None:
        """Where a source (defect-free) image is linked as a training image: <category>/train/good/<name>."""
        if not source_image:
            return None
        return self.root / self.category / "train" / "good" / Path(source_image).name

    def link_good_images(self) -> int:
        """Link every finished item's source image into <category>/train/good (anomalib's MVTec datamodule
        trains on it); hard links, copies where links fail. Returns how many are linked."""
        linked = 0
        for row in self.finished().values():
            good = self.good_path(row.get("source_image"))
            source = row_file(self.root, row.get("source_image"))
            if good is None or source is None or not source.is_file():
                continue
            if not good.exists():
                good.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(source, good)
                except OSError:
                    atomic_write(good, lambda p, s=source: shutil.copyfile(s, p))
            linked += 1
        return linked

    def attention_path(self, index: int, defect: int | None = None) -> Path:
        step = "" if defect is None else f"_{defect}"
        return self.root / "attention" / self.category / self.defect_type / f"{index:0{self.digits}d}{step}_attn.png"

    def part_path(self, rank: int) -> Path:
        return self.root / f"manifest.part{rank}.jsonl"

    def writing_path(self, part: Path) -> Path:
        """The `.writing` journal beside a manifest part: the files its process is about to write."""
        return self.root / f".writing.{part.name.split('.', 1)[1]}"

    def owned(self) -> set[str]:
        """Every file (relative, normalised) that a manifest row or a `.writing` row of this folder names."""
        names: set[str] = set()
        for path in self.manifest_files() + sorted(self.root.glob(WRITING_GLOB)):
            if path.is_file():
                names |= {os.path.normpath(n) for n in _row_files(path)}
        return names

    def foreign_files(self, paths: list[Path], owned: set[str] | None = None) -> list[Path]:
        """Those of `paths` that exist but are not ours (`owned`): writing there would destroy someone's file."""
        owned = self.owned() if owned is None else owned
        return [p for p in paths if (p.exists() or p.is_symlink())
                and os.path.normpath(os.path.relpath(p, self.root)) not in owned]

    def item_files(self, index: int) -> list[Path]:
        """The MVTec-tree files of item `index`: its image and its mask."""
        return [self.image_path(index), self.mask_path(index)]

    def reserve(self, part: Path, paths: list[Path]) -> None:
        """Before writing `paths`: refuse any that holds a file not ours, then record them as ours."""
        foreign = self.foreign_files(paths)
        if foreign:
            raise DefectFillError(foreign_message(self.root, foreign))
        append_row(self.writing_path(part), {"files": [str(p.relative_to(self.root)) for p in paths]})

    def add_row(self, part: Path, row: dict[str, Any]) -> None:
        """Append a finished item's row to `part`, then drop `part`'s journal: the row names the item's files
        now, and a process writes one item at a time, so the journal holds nothing else (it never grows)."""
        append_row(part, row)
        self.writing_path(part).unlink(missing_ok=True)

    def clean_journals(self) -> list[Path]:
        """Before a job (re)starts here: the half-written item files a killed job's journals name and no row
        names are removed (only names of an item's image or mask inside this folder; a journal is read back,
        not trusted), then the journals. Returns the files removed."""
        journals = sorted(self.root.glob(WRITING_GLOB))
        if not journals:
            return []
        named: set[str] = set()
        for path in self.manifest_files():
            if path.is_file():
                named |= {os.path.normpath(n) for n in _row_files(path)}
        removed = []
        for journal in journals:
            for name in _row_files(journal):
                name = os.path.normpath(name)
                if name in named or not _ITEM_FILE.fullmatch(name.replace(os.sep, "/")):
                    continue
                path = self.root / name
                if path.is_file() or path.is_symlink():
                    path.unlink()
                    removed.append(path)
            journal.unlink(missing_ok=True)
        return removed

    def manifest_files(self) -> list[Path]:
        return [self.root / MANIFEST] + sorted(self.root.glob("manifest.part*.jsonl"))

    def finished(self) -> dict[int, dict]:
        """Manifest rows by index whose image and mask exist; a torn last line (killed mid-write) is ignored."""
        rows: dict[int, dict] = {}
        for path in self.manifest_files():
            if not path.is_file():
                continue
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    index = int(row["index"])
                    # the row's own paths: a later --count may change the width of the file names
                    names = (row["image"], row["mask"])
                except (ValueError, KeyError, TypeError):
                    continue
                # an edited manifest must not make us read, or with --overwrite delete, files elsewhere
                files = [contained(self.root, name, path) for name in names]
                if all(f.is_file() for f in files):
                    rows[index] = row
        return rows

    def merge_manifest(self) -> int:
        """Fold the per-process parts into one manifest.jsonl sorted by index; returns its row count."""
        rows = self.finished()
        text = "".join(json.dumps(rows[i]) + "\n" for i in sorted(rows))
        atomic_write(self.root / MANIFEST, lambda p: p.write_text(text))
        for part in self.root.glob("manifest.part*.jsonl"):
            part.unlink()
        return len(rows)


def output_identity(run_dirs: list[Path], settings: GenerateConfig) -> dict[str, Any]:
    """What decides the results in an output folder: the run(s) (their exact config.json) and the settings."""
    recorded = [read_recorded_config(d) or {} for d in run_dirs]
    # one run hashes its own config, not a one-item list: the identity a folder of one run records stays the same
    # whatever version wrote it
    config_hash = hashlib.sha256(json.dumps(recorded[0] if len(recorded) == 1 else recorded,
                                            sort_keys=True).encode()).hexdigest()[:16]
    return {"run": ",".join(str(d.resolve()) for d in run_dirs), "run_config_sha256": config_hash,
            "settings": settings.identity()}


def output_problem(out: OutputFolder, identity: dict[str, Any], resume: bool, overwrite: bool) -> str | None:
    """Why the output folder may not be written (another run's results, foreign files), or None. Writes nothing."""
    state_path = out.root / STATE
    if out.root.exists() and not out.root.is_dir():
        return f"--output {out.root}: is a file, not a folder. Choose a folder (a new one is made)."
    if overwrite and state_path.is_file():
        return None
    if state_path.is_file():
        try:
            previous = json.loads(state_path.read_text())
        except ValueError:
            previous = None
        if isinstance(previous, dict):
            previous = {k: previous.get(k) for k in identity}
        # a folder with no finished item holds nothing to protect (e.g. a first attempt that failed early)
        if previous != identity and not resume and out.finished():
            what = "another run" if previous is None or previous.get("run") != identity["run"] or \
                previous.get("run_config_sha256") != identity["run_config_sha256"] else "other settings"
            return (f"--output {out.root}: holds results of {what} ({state_path}). Pass --resume to add to them, "
                    "--overwrite to replace them, or choose another --output folder.")
    elif out.root.is_dir() and any(p.name not in IGNORED for p in out.root.iterdir()):
        # neither --resume nor --overwrite: nothing in a folder this tool did not make is ours to replace
        others = sorted(p.name for p in out.root.iterdir() if p.name not in IGNORED)
        return (f"--output {out.root}: folder is not empty and was not written by `defectfill generate` "
                f"({', '.join(others[:5])}). Choose an empty or new folder.")
    return None


def foreign_message(root: Path, foreign: list[Path]) -> str:
    return (f"--output {root}: {foreign[0]} is not a file this folder's manifest names (it was not written by "
            f"`defectfill generate`{f', nor {len(foreign) - 1} more' if len(foreign) > 1 else ''}); "
            "refusing to write over it. Move it away, or choose another --output folder.")


def items_problem(out: OutputFolder, indices: list[int]) -> str | None:
    """Why the items `indices` may not be written: a file at one of their paths that is not ours. Writes nothing."""
    out.finished()  # first a row naming a path outside the folder: the edited manifest is what to name
    owned = out.owned()
    foreign = [p for i in indices for p in out.foreign_files(out.item_files(i), owned)]
    return foreign_message(out.root, foreign) if foreign else None


def _remove_own_trees(root: Path) -> None:
    """The files this tool names in its own sub-trees (candidates, attention maps, defect masks, preview strips),
    then the folders left empty; anything else the user put there stays."""
    for tree, pattern in OWN_TREES.items():
        for path in sorted((root / tree).glob("*/*/*")):
            if path.is_file() and not path.is_symlink() and pattern.fullmatch(path.name):
                path.unlink()
    for path in sorted((root / PREVIEW_DIR).glob("*")):
        if path.is_file() and PREVIEW_NAME.fullmatch(path.name):
            path.unlink()
    for tree in [*OWN_TREES, PREVIEW_DIR]:
        folders = sorted((p for p in (root / tree).glob("**/") if p.is_dir()), key=lambda p: -len(p.parts))
        for folder in folders:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only an empty one goes


def prepare_output(
    out: OutputFolder, identity: dict[str, Any], resume: bool, overwrite: bool, record: dict[str, Any]
) -> None:
    """Refuse a folder holding other results unless told; clear our own files for --overwrite; record the settings."""
    problem = output_problem(out, identity, resume, overwrite)
    if problem:
        raise DefectFillError(problem)
    state_path = out.root / STATE
    if overwrite and state_path.is_file():
        # only what this tool writes is removed (the files its rows name); anything else the user keeps there stays
        finished = out.finished()  # refuses a row naming a path outside the folder before anything is removed
        for name in sorted(out.owned()):
            path = contained(out.root, name, manifest_path(out.root))
            if Path(name).parts[:1] == (REJECTED_DIR,):
                continue  # a person's curation: the rejected items stay (only the manifest forgets them)
            if path.is_file() or path.is_symlink():
                path.unlink()
        for row in finished.values():
            good = out.good_path(row.get("source_image"))
            source = Path(row.get("source_image") or "")
            # a link of the row's own source (or a copy of it) is ours; another file of that name is not
            if good is not None and good.is_file() and source.is_file() and _same_file(good, source):
                good.unlink()
        _remove_own_trees(out.root)
        for p in out.manifest_files() + sorted(out.root.glob(WRITING_GLOB)) + [out.root / PREVIEW, state_path]:
            p.unlink(missing_ok=True)
    out.root.mkdir(parents=True, exist_ok=True)
    out.clean_journals()  # a killed job's half-written item is redrawn; its journal goes
    write_json(state_path, {**identity, **record})


def _same_file(a: Path, b: Path) -> bool:
    try:
        if os.path.samefile(a, b):
            return True
        return a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()
    except OSError:
        return False


def save_png(image: Image.Image, path: Path) -> None:
    atomic_write(path, lambda p: image.save(p, format="PNG"))


def thumb(image: Image.Image, side: int) -> Image.Image:
    return image.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)


CAPTION_H = 14  # px under each tile for its label
PREVIEW_UNTRAINED = ("LFS scores from an UNTRAINED AlexNet (--lpips-random-backbone):",
                     "not perceptual; the chosen candidate is not the least normal-looking one")


def preview_strip(source: Image.Image, result: GenerationResult, side: int = 128) -> Image.Image:
    """source | mask | chosen | other candidates, each `side` px, captioned with the LFS scores.

    The chosen candidate is framed in green, so a person sees at once what selection kept.
    """
    from PIL import ImageDraw

    order = [result.chosen] + [i for i in range(len(result.candidates)) if i != result.chosen]
    mask_im = Image.fromarray(result.mask.astype(np.uint8) * 255, mode="L")
    tiles = [(source, "source"), (mask_im, "mask")]
    for rank, i in enumerate(order):
        score = f" {result.scores[i]:.3f}" if result.scores else ""
        tiles.append((result.candidates[i], ("chosen" if rank == 0 else f"#{i}") + score))
    strip = Image.new("RGB", (side * len(tiles), side + CAPTION_H), (0, 0, 0))
    draw = ImageDraw.Draw(strip)
    for k, (tile, caption) in enumerate(tiles):
        strip.paste(thumb(tile, side), (k * side, 0))
        draw.text((k * side + 3, side + 1), caption, fill=(230, 230, 230))
    draw.rectangle([2 * side, 0, 3 * side - 1, side - 1], outline=(0, 220, 0), width=2)
    return strip


def write_preview(out: OutputFolder) -> None:
    strips = [open_image(p).convert("RGB") for p in sorted((out.root / PREVIEW_DIR).glob("*.png"))]
    if not strips:
        return
    # a preview is looked at without the report beside it: say on the picture when the scores mean nothing
    banner = PREVIEW_UNTRAINED if selection_network(out.root) == "untrained AlexNet" else None
    top = 2 * CAPTION_H if banner else 0
    sheet = Image.new("RGB", (max(s.width for s in strips), top + sum(s.height for s in strips)), (0, 0, 0))
    if banner:
        from PIL import ImageDraw

        draw = ImageDraw.Draw(sheet)
        draw.rectangle([0, 0, sheet.width, top - 1], fill=(120, 20, 20))
        for k, line in enumerate(banner):
            draw.text((4, 1 + k * CAPTION_H), line, fill=(255, 255, 255))
    y = top
    for s in strips:
        sheet.paste(s, (0, y))
        y += s.height
    save_png(sheet, out.root / PREVIEW)


def save_mask(mask: np.ndarray, path: Path) -> None:
    save_png(Image.fromarray(mask.astype(np.uint8) * 255, mode="L"), path)


def save_candidates_and_attention(out: OutputFolder, index: int, result: GenerationResult, save_candidates: bool,
                                   defect: int | None = None) -> str | None:
    """The candidates (if asked) and the attention map (if recorded) of one painted defect; returns the map's path
    relative to the output folder, for the manifest (None without one)."""
    if save_candidates:
        for c, cand in enumerate(result.candidates):
            save_png(cand, out.candidate_path(index, c, defect))
    if result.attention is None:
        return None
    heat = Image.fromarray(np.rint(result.attention * 255).astype(np.uint8), mode="L")
    save_png(heat, out.attention_path(index, defect))
    return str(out.attention_path(index, defect).relative_to(out.root))


def append_row(part: Path, row: dict[str, Any]) -> None:
    """Append one manifest row to `part`, flushed to disk: called only once the item's files exist, so a row
    always means a finished item."""
    with writing_into(part.parent), open(part, "a") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def write_item(out: OutputFolder, item: Item, source: Image.Image, result: GenerationResult, prompt: str,
               settings_identity: dict[str, Any], part: Path, save_candidates: bool = False,
               preview_rows: int = 0, defect_type: str | None = None,
               provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write one generated item (image, mask, candidates, attention map, preview strip), then append its
    manifest row to `part`; returns the row. `defect_type` goes in the row when the output holds drawn types
    (a per-object run). `defectfill generate` and the browser UI (`defectfill ui`) both write through here."""
    out.reserve(part, out.item_files(item.index))  # a file there that is not ours is refused, never replaced
    save_png(result.image, out.image_path(item.index))
    save_mask(result.mask, out.mask_path(item.index))
    attention = save_candidates_and_attention(out, item.index, result, save_candidates)
    if item.index < preview_rows:
        save_png(preview_strip(source, result), out.root / PREVIEW_DIR / f"{item.index:06d}.png")
    row = {
        "index": item.index, "image": str(out.image_path(item.index).relative_to(out.root)),
        "mask": str(out.mask_path(item.index).relative_to(out.root)),
        "source_image": folder_relative(out.root, item.image), "mask_source": row_mask_source(out.root, item.mask_source),
        "prompt": prompt, "seed": item.seed,
        "candidate_seeds": result.seeds, "scores": result.scores, "chosen": result.chosen,
    }
    if defect_type is not None:
        row["defect_type"] = defect_type
    if attention is not None:
        row["attention"] = attention
    row["settings"] = settings_identity
    if provenance is not None:
        row["provenance"] = stamped(provenance)
    out.add_row(part, row)
    return row


def finish_output(out: OutputFolder, with_good: bool) -> int:
    """One manifest.jsonl from the parts, the defect-free sources linked (with_good), preview.png; returns the
    manifest's row count."""
    total = out.merge_manifest()
    if with_good:
        out.link_good_images()
    write_preview(out)
    return total


