"""The reports: an evaluation's folder and a whole `run`'s report, each as report.html and report.md.

    <evaluation>/                      what `defectfill evaluate` writes
      metrics.json                     every metric, saved as results come
      report.html, report.md           the report (the HTML self-contained, the markdown linking the PNGs)
      samples_<category>_<type>.png    real held-out vs generated, outlined, with close-ups (one grid per type)
      losses_<category>_<type>.png     the run's training losses (with --run)
      lfs_<category>_<type>.png        the Low-Fidelity Selection scores of the generated items
      areas_<category>_<type>.png      defect areas, real vs generated
      confusion_<category>.png         the downstream classifier's confusion matrix

The HTML embeds every picture as a base64 data URI, so it opens from disk in a
browser with no server and survives being mailed as one file. The markdown
links the same pictures saved as PNG files next to it. Both pages are jinja2
templates (templates/, one shared base): each number is shown with the way that
is good, the images it was measured on and a caution where those are too few.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from defectfill.core.atomic import atomic_write, write_json, write_text
from defectfill.data.images import load_mask, load_rgb
from defectfill.outputs.charts import histogram, line_chart

Pair = tuple[Path, Path | None]  # (image, mask or None)

METRICS_NAME = "metrics.json"
REPORT_HTML = "report.html"
REPORT_MD = "report.md"
TEMPLATES = Path(__file__).parent / "templates"  # the pages' jinja2 templates


def sample_grid_name(category: str, defect_type: str) -> str:
    """The picture name (no .png) of a type's sample grid in the evaluation folder."""
    return f"samples_{category}_{defect_type}"


SMALL_DEFECT = 0.25  # a defect whose box covers less of the image than this gets a close-up
OUTLINE = (255, 0, 160)  # the mask contour: a magenta few defects share


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """The mask's bounding box (left, top, right, bottom; exclusive), None for an empty mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def close_up_box(mask: np.ndarray, margin: float = 1.5, least: int = 16) -> tuple[int, int, int, int] | None:
    """A square around a small defect (its box grown by `margin` on each side, at least `least` px), inside the
    image; None when the mask is empty or the defect is large enough to see whole."""
    box = _mask_box(mask)
    if box is None:
        return None
    h, w = mask.shape
    bw, bh = box[2] - box[0], box[3] - box[1]
    if bw * bh >= SMALL_DEFECT * w * h:
        return None
    side = min(max(int(max(bw, bh) * (1 + 2 * margin)), least), w, h)
    cx, cy = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
    left, top = min(max(cx - side // 2, 0), w - side), min(max(cy - side // 2, 0), h - side)
    return left, top, left + side, top + side


def outlined(image: Image.Image, mask: np.ndarray | None) -> Image.Image:
    """`image` with the defect's contour drawn just outside its mask (torchvision's draw_segmentation_masks), so
    the defect's own pixels stay as they are."""
    if mask is None or not mask.any():
        return image
    import torch
    import torch.nn.functional as F
    from torchvision.utils import draw_segmentation_masks

    if mask.shape != (image.height, image.width):
        mask = np.asarray(Image.fromarray(mask).resize(image.size, Image.Resampling.NEAREST))
    inside = torch.tensor(mask, dtype=torch.bool)
    width = max(1, min(image.size) // 64)
    grown = F.max_pool2d(inside[None, None].float(), 2 * width + 1, stride=1, padding=width)[0, 0] > 0
    pixels = torch.tensor(np.asarray(image.convert("RGB"))).permute(2, 0, 1).contiguous()
    drawn = draw_segmentation_masks(pixels, grown & ~inside, alpha=1.0, colors=OUTLINE)
    return Image.fromarray(drawn.permute(1, 2, 0).numpy())


def _tiles(pair: Pair, size: int, mask_rule: str) -> tuple[Image.Image, Image.Image | None]:
    """A pair as its outlined tile and, for a small defect, its outlined close-up (None otherwise)."""
    image = load_rgb(pair[0])
    mask = load_mask(pair[1], mask_rule) if pair[1] is not None else None
    if mask is not None and mask.shape != (image.height, image.width):
        mask = np.asarray(Image.fromarray(mask).resize(image.size, Image.Resampling.NEAREST))
    # the outline is drawn at the tile's scale, so it stays thin on a large photo and visible on a small one
    scaled = image.resize((size, size), Image.Resampling.BICUBIC)
    small_mask = None if mask is None else np.asarray(
        Image.fromarray(mask).resize((size, size), Image.Resampling.NEAREST))
    tile = outlined(scaled, small_mask)
    box = close_up_box(mask) if mask is not None else None
    if box is None:
        return tile, None
    crop = image.crop(box).resize((size, size), Image.Resampling.NEAREST)
    crop_mask = np.asarray(Image.fromarray(mask).crop(box).resize((size, size), Image.Resampling.NEAREST))
    return tile, outlined(crop, crop_mask)


def sample_grid(real: Sequence[Pair], generated: Sequence[Pair], n: int = 8, tile: int = 96,
                real_mask_rule: str = "half") -> Image.Image:
    """Real held-out images and generated ones (up to n columns each), the defect outlined on each, and a
    close-up row under each where a defect is small (torchvision's make_grid lays the tiles out).

    `real_mask_rule`: how the real dataset's masks are read ("nonzero" for VisA); generated ones are 0/255."""
    import torch
    from torchvision.utils import make_grid

    real, generated = list(real)[:n], list(generated)[:n]
    cols = max(len(real), len(generated), 1)
    label_w, pad = 110, 4
    blank = Image.new("RGB", (tile, tile), (255, 255, 255))
    rows: list[tuple[str, list[Image.Image | str]]] = []
    for label, pairs, rule in (("real held-out", real, real_mask_rule), ("generated", generated, "half")):
        made = [_tiles(p, tile, rule) for p in pairs]
        rows.append((label, [t for t, _ in made]))
        if any(c is not None for _, c in made):  # a close-up row only where some defect is small
            rows.append((f"{label}: close-up", [c if c is not None else "large defect" for _, c in made]))
    tensors = []
    for _, cells in rows:
        cells = cells + [blank] * (cols - len(cells))
        for cell in cells:
            if isinstance(cell, str):  # the whole defect is visible in the tile above
                cell_image = blank.copy()
                ImageDraw.Draw(cell_image).text((4, tile // 2 - 6), cell, fill=(120, 120, 120))
                cell = cell_image
            tensors.append(torch.tensor(np.asarray(cell.convert("RGB"))).permute(2, 0, 1))
    laid = make_grid(tensors, nrow=cols, padding=pad, pad_value=255)
    tiles = Image.fromarray(laid.permute(1, 2, 0).numpy())
    grid = Image.new("RGB", (label_w + tiles.width, tiles.height), (255, 255, 255))
    grid.paste(tiles, (label_w, 0))
    draw = ImageDraw.Draw(grid)
    for r, (label, cells) in enumerate(rows):
        y = pad + r * (tile + pad)
        draw.text((4, y + tile // 2 - 6), label, fill=(0, 0, 0))
        if not cells:
            draw.text((label_w + pad + 4, y + tile // 2 - 6), "none", fill=(128, 0, 0))
    return grid


def confusion_picture(matrix: Sequence[Sequence[int]], classes: Sequence[str], cell: int = 56) -> Image.Image:
    """The confusion matrix as a shaded table (rows: true type, columns: predicted type)."""
    k = len(classes)
    label_w = max(80, 8 * max((len(c) for c in classes), default=4))
    img = Image.new("RGB", (max(label_w + k * cell + 1, 230), 20 + label_w // 2 + k * cell + 1), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    top = 20 + label_w // 2
    draw.text((4, 2), "rows: true type, columns: predicted", fill=(0, 0, 0))
    for j, name in enumerate(classes):
        draw.text((label_w + j * cell + 2, top - 14), name[: cell // 7], fill=(0, 0, 0))
    for i, name in enumerate(classes):
        draw.text((2, top + i * cell + cell // 2 - 6), name[: label_w // 7], fill=(0, 0, 0))
        total = max(1, sum(matrix[i]))
        for j in range(k):
            v = int(matrix[i][j])
            shade = int(255 - 200 * v / total)
            box = [label_w + j * cell, top + i * cell, label_w + (j + 1) * cell, top + (i + 1) * cell]
            draw.rectangle(box, fill=(shade, shade, 255), outline=(0, 0, 0))
            draw.text((box[0] + cell // 2 - 6, box[1] + cell // 2 - 6), str(v), fill=(0, 0, 0) if shade > 120 else (255, 255, 255))
    return img


def loss_picture(rows: Sequence[dict[str, Any]]) -> Image.Image | None:
    """The training losses by step (a run's metrics.jsonl rows; a step logged twice by a resume: the later row)."""
    by_step = {int(r["step"]): r for r in rows if isinstance(r.get("loss"), dict)}
    if not by_step:
        return None
    names = sorted({k for r in by_step.values() for k in r["loss"]}, key=lambda k: (k == "total", k))
    series = {name: [(step, r["loss"][name]) for step, r in sorted(by_step.items())
                     if isinstance(r["loss"].get(name), (int, float))] for name in names}
    return line_chart(series, "training losses (lower is better)", "step", "loss")


def lfs_picture(rows: Sequence[dict[str, Any]]) -> Image.Image | None:
    """Low-Fidelity Selection scores of generated items (manifest rows): the chosen candidate's and the others'."""
    chosen, others = [], []
    for row in rows:
        scores, pick = row.get("scores"), row.get("chosen")
        if not isinstance(scores, list) or not isinstance(pick, int) or not scores:
            continue
        for i, score in enumerate(scores):
            if isinstance(score, (int, float)):
                (chosen if i == pick else others).append(float(score))
    if not chosen:
        return None
    return histogram({"chosen": chosen, "other candidates": others},
                     "LFS score: LPIPS to the defect-free source (higher = less like it)", "LFS score")


def mask_area(path: Path, rule: str = "half") -> float:
    """The share of the image a mask file covers, in percent."""
    mask = load_mask(path, rule)
    return 100.0 * float(mask.mean()) if mask.size else 0.0


def area_picture(real: Sequence[float], generated: Sequence[float]) -> Image.Image | None:
    """Defect areas (percent of the image) of the real held-out and the generated images, side by side."""
    if not real and not generated:
        return None
    return histogram({"real held-out": list(real), "generated": list(generated)},
                     "defect area: real vs generated", "mask area (% of the image)")


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _rows(record: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Flatten a metric record into (name, value) rows; long lists (losses, predictions) are left out."""
    rows: list[tuple[str, str]] = []
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(_rows(value, name + "."))
        elif isinstance(value, list):
            if key in ("train_loss",) and value:
                rows.append((f"{name} (last)", _fmt(value[-1])))
            elif key in ("notes",):
                rows.extend((name, str(v)) for v in value)
            elif len(value) <= 16 and all(not isinstance(v, (dict, list)) for v in value):
                rows.append((name, ", ".join(_fmt(v) for v in value)))
        else:
            rows.append((name, _fmt(value)))
    return rows


# Sample sizes below which a number is shown with a caution. KID: the estimator's spread on fewer than about 50
# images per side is as large as the differences between good and bad generators. Downstream: one test image moves
# a score by 1/n, so below 30 a difference of a few points is one or two images.
KID_RELIABLE_N = 50
TEST_RELIABLE_N = 30


@dataclass
class Reading:
    """One number of a report as a quality engineer reads it: what it is, which way is good, on how many images,
    and what to be careful about."""

    name: str
    value: str
    direction: str
    sample: str
    cautions: list[str] = dataclasses.field(default_factory=list)


def _kid_reading(item: dict[str, Any], k: dict[str, Any]) -> Reading:
    n_real, n_gen = k.get("n_real", item.get("n_real_held_out")), k.get("n_generated", item.get("n_generated"))
    sample = f"{n_real} real held-out, {n_gen} generated images"
    direction = "lower is better (0: the generated images are indistinguishable from the real ones)"
    if not k.get("available"):
        return Reading("Realism gap (KID x 10^3)", f"unavailable: {k.get('reason')}", direction, sample)
    sample += f"; {k['subsets']} random subsets of {k['subset_size']}"
    cautions = []
    smallest = min(n for n in (n_real, n_gen) if isinstance(n, int)) if any(
        isinstance(n, int) for n in (n_real, n_gen)) else 0
    if smallest < KID_RELIABLE_N:
        cautions.append(f"Unreliable: KID on {smallest} images per side (fewer than about {KID_RELIABLE_N}) "
                        "varies more between random subsets than between good and bad generators. Read it as a "
                        "rough sign only, and do not rank runs by it.")
    if k["mean"] < 0:
        cautions.append("A negative KID is not 'better than perfect': KID is an unbiased estimate, so where the "
                        "two image sets do not differ measurably it scatters around 0 and can fall below it.")
    if k["std"] > abs(k["mean"]):
        cautions.append("The spread (±) is larger than the value: differences smaller than it between runs mean "
                        "nothing.")
    return Reading("Realism gap (KID x 10^3)", f"{k['mean_x1e3']:.3f} ± {k['std_x1e3']:.3f}", direction, sample,
                   cautions)


def _ic_lpips_reading(ic: dict[str, Any]) -> Reading:
    sizes = ic.get("cluster_sizes")
    sample = f"{ic.get('n_generated')} generated images, grouped by their closest of {ic.get('n_references')} references"
    if sizes:
        sample += f" (group sizes {', '.join(map(str, sizes))})"
    direction = "higher is better (more varied images; 0: all alike)"
    if not ic.get("available"):
        return Reading("Diversity (IC-LPIPS)", f"unavailable: {ic.get('reason')}", direction, sample)
    cautions = []
    if sizes and len(sizes) > 1 and max(sizes) == sum(sizes):
        cautions.append(f"Diversity warning: every generated image is closest to the same reference (group sizes "
                        f"{', '.join(map(str, sizes))}), so the images may all look like that one reference. "
                        "Look at the samples below.")
    if sizes and any(s < 2 for s in sizes):
        cautions.append(f"Groups with fewer than 2 images count as 0 in this value; leaving them out gives "
                        f"{ic['value_excluding_singletons']:.4f}.")
    return Reading("Diversity (IC-LPIPS)", f"{ic['value']:.4f}", direction, sample, cautions)


def type_readings(item: dict[str, Any]) -> list[Reading]:
    """The readings of one defect type's image metrics (an `image_metrics` entry of metrics.json)."""
    readings = [Reading("Images compared", f"{item.get('n_real_held_out')} real held-out, "
                        f"{item.get('n_generated')} generated", "-",
                        f"{item.get('n_references', '?')} references trained on (never compared)",
                        [str(n) for n in item.get("notes", [])])]
    if item.get("kid") is not None:
        readings.append(_kid_reading(item, item["kid"]))
    if item.get("ic_lpips") is not None:
        readings.append(_ic_lpips_reading(item["ic_lpips"]))
    return readings


def _test_caution(n: int | None) -> list[str]:
    if isinstance(n, int) and n < TEST_RELIABLE_N:
        return [f"Tested on {n} real images: one image moves the score by {1 / max(n, 1):.2f}."]
    return []


def downstream_readings(metrics: dict[str, Any]) -> list[Reading]:
    """The inspection models' scores: trained on the real references, on both and on the synthetic images only,
    always tested on the real held-out images."""
    down, readings = metrics.get("downstream", {}), []
    cls, loc = down.get("classify") or {}, down.get("localize") or {}
    n_cls = cls.get("n_test")
    n_loc = (loc.get("n_test_defect") or 0) + (loc.get("n_test_good") or 0) if loc.get("n_test_defect") is not None \
        else None
    plain = {"classify accuracy": ("Defect type classifier: accuracy", n_cls),
             "localize image AUROC": ("Defect detector: image AUROC", n_loc),
             "localize image AP": ("Defect detector: image AP", n_loc),
             "localize pixel AUROC": ("Defect localiser: pixel AUROC", n_loc),
             "localize pixel AP": ("Defect localiser: pixel AP", n_loc),
             "localize PRO": ("Defect localiser: PRO (FPR <= 0.3)", n_loc)}
    for metric, values in metrics.get("downstream_comparison", {}).items():
        name, n = plain.get(metric, (metric, None))
        shown = " / ".join(_fmt(values.get(k)) for k in ("real", "real+synthetic", "synthetic"))
        gain = values.get("gain real+synthetic over real")
        readings.append(Reading(
            f"{name} (trained on real / real+synthetic / synthetic)",
            f"{shown}; adding the synthetic images: {'n/a' if gain is None else f'{gain:+.4f}'}",
            "higher is better (1: perfect" + (", 0.5: chance)" if "AUROC" in metric else ")"),
            f"{n} real test images" if n is not None else "-", _test_caution(n)))
    if not readings:
        if "accuracy" in cls:
            readings.append(Reading("Defect type classifier: accuracy (trained on synthetic)", _fmt(cls["accuracy"]),
                                    "higher is better (1: perfect)", f"{n_cls} real test images",
                                    _test_caution(n_cls)))
        for level in ("image", "pixel") if "image" in loc else ():
            r = loc[level]
            readings.append(Reading(f"Defect {'detector' if level == 'image' else 'localiser'}: {level} AUROC / AP / "
                                    "F1-max (trained on synthetic)",
                                    f"{_fmt(r['auroc'])} / {_fmt(r['ap'])} / {_fmt(r['f1_max'])}",
                                    "higher is better (1: perfect; AUROC 0.5: chance)",
                                    f"{n_loc} real test images" if n_loc is not None else "-", _test_caution(n_loc)))
        if loc.get("pro") is not None:
            readings.append(Reading("Defect localiser: PRO (FPR <= 0.3)", _fmt(loc["pro"]), "higher is better",
                                    f"{n_loc} real test images" if n_loc is not None else "-", _test_caution(n_loc)))
    return readings


UNTRAINED_LFS = ("Low-Fidelity Selection ran on an untrained (random) AlexNet (--lpips-random-backbone): its "
                 "scores measure no perceptual difference, so the kept candidate is not the least normal-looking "
                 "one, only one of the candidates.")


def general_cautions(settings: dict[str, Any]) -> list[str]:
    """What the whole evaluation's numbers rest on that a reader must know (stand-in networks)."""
    cautions = []
    if settings.get("selection_lpips") == "untrained AlexNet":
        cautions.append(UNTRAINED_LFS)
    if settings.get("kid") and settings.get("kid_features") == "custom":
        cautions.append("KID used a stand-in feature network, not Inception-V3: compare it only with runs "
                        "evaluated the same way, never with published values.")
    if settings.get("ic_lpips") and settings.get("lpips_network") == "custom":
        cautions.append("IC-LPIPS used a stand-in distance network, not the trained LPIPS AlexNet: compare it only "
                        "with runs evaluated the same way.")
    return cautions


SETTING_NAMES = {
    "generated": "generated images", "run": "run folder", "data": "real dataset", "category": "category",
    "defect_types": "defect types", "kid": "KID measured", "kid_subset_size": "KID subset size asked",
    "kid_subsets": "KID subsets", "kid_features": "KID feature network", "ic_lpips": "IC-LPIPS measured",
    "lpips_size": "LPIPS image size (px)", "lpips_network": "LPIPS network", "downstream": "inspection models",
    "run_resolution": "training resolution (px)", "selection_lpips": "Low-Fidelity Selection network",
}

PICTURES = [  # name prefix -> heading, what it shows
    ("samples_", "Real and generated defects",
     "The defect is outlined in magenta just outside its mask; small defects get a close-up row."),
    ("losses_", "Training losses", "Each loss by training step, from the run's metrics.jsonl."),
    ("lfs_", "Low-Fidelity Selection scores",
     "How far each candidate is from the defect-free source (LPIPS); selection keeps the highest."),
    ("areas_", "Defect sizes: real vs generated",
     "The share of the image each defect mask covers; generated masks far from the real ones paint other defects."),
    ("confusion_", "Which type the classifier predicted", "Rows: the true type; columns: the predicted one."),
]


def picture_heading(name: str) -> tuple[str, str]:
    """A picture's heading and caption, from its name's prefix (the rest names the category and type)."""
    for prefix, heading, caption in PICTURES:
        if name.startswith(prefix):
            rest = name[len(prefix):].replace("_", " / ", 1)
            return (f"{heading}: {rest}" if rest else heading), caption
    return name, ""


def _sections(metrics: dict[str, Any]) -> list[tuple[str, list[tuple[str, str]]]]:
    """Every recorded value by its metrics.json key, for whoever needs the exact record."""
    sections = []
    for item in metrics.get("image_metrics", []):
        title = f"{item['category']} / {item['defect_type']}: KID and IC-LPIPS"
        sections.append((title, _rows({k: v for k, v in item.items() if k not in ("category", "defect_type")})))
    for name, record in metrics.get("downstream", {}).items():
        shown = {k: v for k, v in record.items() if k not in ("predictions", "confusion_matrix")}
        rows = _rows(shown)
        if "confusion_matrix" in record and "classes" in record:
            rows += [(f"confusion[true={c}] (columns: {', '.join(record['classes'])})", ", ".join(map(str, row)))
                     for c, row in zip(record["classes"], record["confusion_matrix"], strict=True)]
        sections.append((f"Downstream: {name}", rows))
    check = metrics.get("token_check")
    if check:
        rows = [("verdict", token_check_summary(check)), ("rule", check.get("rule", "")),
                ("masks", f"{check.get('masks')} ({check.get('origin', '')}), {check.get('steps')} steps")]
        rows += [(f"{r['prompt']} ({r['text']!r}) at guidance {r['guidance']:g}", f"{r['distance']:.4f}")
                 for r in check.get("distances", [])]
        sections.append(("Token self-check", rows))
    sections.append(("Settings", _rows(metrics.get("settings", {}))))
    return sections


def token_check_summary(record: dict[str, Any]) -> str:
    """The token self-check's verdict in one line with its numbers (report, `evaluate`'s summary, the UI)."""
    return (f"{record['verdict']} (distance to the real defects at guidance {record['guidance']:g}: "
            f"{record['with_token']:.4f} with the token, {record['without_token']:.4f} without, "
            f"{record['untouched']:.4f} untouched)")


def _environment():
    """The reports' templates (templates/*.html, autoescaped: names and paths from the data are text, not HTML)."""
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def _md_readings(readings: Sequence[Reading]) -> list[str]:
    lines = ["| what | value | which way is good | measured on | caution |", "| --- | --- | --- | --- | --- |"]
    for r in readings:
        cells = [r.name, r.value, r.direction, r.sample, " ".join(r.cautions) or "-"]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return lines + [""]


def write_report(output: str | Path, metrics: dict[str, Any], pictures: dict[str, Image.Image],
                 note: str | None = None) -> dict[str, Path]:
    """Write metrics.json, report.html, report.md and the pictures (PNG) into `output`; `note` heads the report."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / METRICS_NAME, metrics)
    shown = []
    for name, picture in pictures.items():
        data = _png_bytes(picture)
        atomic_write(output / f"{name}.png", lambda p, d=data: p.write_bytes(d))
        heading, caption = picture_heading(name)
        shown.append({"name": name, "heading": heading, "caption": caption,
                      "data": base64.b64encode(data).decode("ascii")})
    settings = metrics.get("settings", {})
    types = [{"heading": f"{item['category']} / {item['defect_type']}", "readings": type_readings(item)}
             for item in metrics.get("image_metrics", [])]
    downstream = downstream_readings(metrics)
    cautions = general_cautions(settings)
    setting_rows = [(SETTING_NAMES.get(k, k.replace("_", " ")), _fmt(v) if not isinstance(v, list)
                     else ", ".join(map(_fmt, v))) for k, v in settings.items() if not isinstance(v, dict)]
    raw = _sections(metrics)
    title = "defectfill evaluation"
    page = _environment().get_template("evaluation.html").render(
        title=title, note=note, cautions=cautions, types=types, downstream=downstream, pictures=shown,
        settings=setting_rows, raw=raw)

    md = [f"# {title}", ""] + ([f"> {note}", ""] if note else []) + [f"**Caution.** {c}\n" for c in cautions]
    for t in types:
        md += [f"## {t['heading']}", ""] + _md_readings(t["readings"])
    if downstream:
        md += ["## Inspection models trained on the images, tested on real ones", ""] + _md_readings(downstream)
    for p in shown:
        md += [f"## {p['heading']}", "", p["caption"], "", f"![{p['name']}]({p['name']}.png)", ""]
    md += ["## Settings", "", "| setting | value |", "| --- | --- |"]
    md += [f"| {k} | {v.replace('|', '/')} |" for k, v in setting_rows] + [""]
    md += ["## Every recorded value, by its metrics.json key", ""]
    for heading, rows in raw:
        md += [f"### {heading}", "", "| key | value |", "| --- | --- |"]
        md += [f"| {k} | {v.replace('|', '/')} |" for k, v in rows] + [""]
    write_text(output / REPORT_HTML, page)
    write_text(output / REPORT_MD, "\n".join(md) + "\n")
    return {"metrics": output / METRICS_NAME, "html": output / REPORT_HTML, "markdown": output / REPORT_MD}


# --------------------------------------------------------------------------- the whole run


def _embedded(path: Path | None) -> str | None:
    """A PNG file as base64 for a data URI, None when it is not there."""
    return base64.b64encode(path.read_bytes()).decode("ascii") if path is not None and path.is_file() else None


def write_run_report(output: Path, rows: list[dict[str, Any]], sections: list[dict[str, Any]],
                     downstream: dict[str, str], note: str | None, seconds: float) -> None:
    """report.html and report.md of a whole `run`.

    rows: one per defect type, the table's columns by name ("run" and "evaluation" are paths relative
    to `output`, linked; "evaluation" may be None when no report was written; "cautions", a list, optional).
    sections: per type a heading, its sample grid and its generation preview (paths), and optional "cautions".
    downstream: category -> report path or what happened instead.
    """
    head = ["category", "defect type", "status", "references", "held out", "generated", "KID x10^3 (± std)",
            "IC-LPIPS"]
    rows = [{**row, "cautions": row.get("cautions", [])} for row in rows]
    links = [(cat, os.path.relpath(where, output) if where.endswith(".html") else None, where)
             for cat, where in downstream.items()]
    shown = [{"title": s["title"], "cautions": s.get("cautions", []), "grid": _embedded(s["grid"]),
              "preview": _embedded(s["preview"])} for s in sections]
    page = _environment().get_template("run.html").render(
        title="defectfill run", note=note, cautions=[], head=head, rows=rows, downstream=links, seconds=seconds,
        sections=shown)
    md = ["# defectfill run", ""] + ([f"> {note}", ""] if note else [])
    md += ["KID: lower is better. IC-LPIPS: higher is better. Each type's evaluation report says how far its "
           "numbers can be trusted.", ""]
    md += ["| " + " | ".join(head + ["caution", "run", "evaluation"]) + " |", "|" + "---|" * (len(head) + 3)]
    md += ["| " + " | ".join([row[h] or "-" for h in head] + [" ".join(row["cautions"]) or "-", row["run"],
                              row["evaluation"] or "-"]) + " |" for row in rows]
    if links:
        md += ["", "## Downstream inspection models", ""] + [f"- {cat}: {link or where}" for cat, link, where in links]
    for section in sections:
        grid = section["grid"]
        md += ["", f"## {section['title']}", ""] + [f"**Caution.** {c}" for c in section.get("cautions", [])]
        md += [f"![samples]({os.path.relpath(grid, output)})" if grid.is_file() else "no sample grid"]
    write_text(output / REPORT_HTML, page)
    write_text(output / REPORT_MD, "\n".join(md) + "\n")
