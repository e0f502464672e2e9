"""The reports: an evaluation's folder and a whole `run`'s report, each as report.html and report.md.

    <evaluation>/                      what `defectfill evaluate` writes
      metrics.json                     every metric, saved as results come
      report.html, report.md           the report (the HTML self-contained, the markdown linking the PNGs)
      samples_<category>_<type>.png    real held-out vs generated (one grid per type), and the other pictures

The HTML embeds every picture as a base64 data URI, so it opens from disk in a
browser with no server and survives being mailed as one file. The markdown
links the same pictures saved as PNG files next to it. Both reports share one
page style (`html_page`).
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from defectfill.core.atomic import atomic_write, write_json, write_text
from defectfill.data.images import load_mask, load_rgb

Pair = tuple[Path, Path | None]  # (image, mask or None)

METRICS_NAME = "metrics.json"
REPORT_HTML = "report.html"
REPORT_MD = "report.md"


def sample_grid_name(category: str, defect_type: str) -> str:
    """The picture name (no .png) of a type's sample grid in the evaluation folder."""
    return f"samples_{category}_{defect_type}"


def _tile(path: Path, size: int, mask: bool = False, mask_rule: str = "half") -> Image.Image:
    if mask:
        arr = load_mask(path, mask_rule).astype(np.uint8) * 255
        return Image.fromarray(arr).convert("RGB").resize((size, size), Image.Resampling.NEAREST)
    return load_rgb(path).resize((size, size), Image.Resampling.BICUBIC)


def sample_grid(real: Sequence[Pair], generated: Sequence[Pair], n: int = 8, tile: int = 96,
                real_mask_rule: str = "half") -> Image.Image:
    """Four rows: real held-out images, their masks, generated images, their masks (up to n columns).

    `real_mask_rule`: how the real dataset's masks are read ("nonzero" for VisA); generated ones are 0/255."""
    real, generated = list(real)[:n], list(generated)[:n]
    cols = max(len(real), len(generated), 1)
    label_w, pad = 110, 4
    rows = [("real held-out", real, False), ("real mask", real, True),
            ("generated", generated, False), ("generated mask", generated, True)]
    grid = Image.new("RGB", (label_w + cols * (tile + pad), len(rows) * (tile + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (label, pairs, is_mask) in enumerate(rows):
        y = r * (tile + pad)
        draw.text((4, y + tile // 2 - 6), label, fill=(0, 0, 0))
        for c, (image, mask) in enumerate(pairs):
            x = label_w + c * (tile + pad)
            if is_mask and mask is None:
                draw.text((x + 4, y + tile // 2 - 6), "no mask", fill=(128, 0, 0))
                continue
            rule = real_mask_rule if r == 1 else "half"  # row 1: the real masks
            grid.paste(_tile(mask if is_mask else image, tile, mask=is_mask, mask_rule=rule), (x, y))
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


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


_STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1300px}table{border-collapse:collapse;margin:1em 0}"
          "td,th{border:1px solid #bbb;padding:3px 8px;text-align:left}th{background:#eee}"
          ".note{background:#fff3cd;padding:8px}img{image-rendering:pixelated;max-width:100%}")


def html_page(title: str, body: list[str]) -> str:
    """A self-contained HTML page: the shared style, the title as heading, then `body`."""
    return "\n".join([
        "<!DOCTYPE html>", "<html><head><meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
        f"<style>{_STYLE}</style>", "</head><body>", f"<h1>{html.escape(title)}</h1>", *body, "</body></html>",
    ]) + "\n"


def img_tag(path: Path, alt: str) -> str:
    """A PNG file embedded as a data URI, or "" when the file is not there."""
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"


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


def _summary_rows(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """The headline numbers, one row each, before the full tables."""
    rows: list[tuple[str, str]] = []
    for item in metrics.get("image_metrics", []):
        head = f"{item['category']}/{item['defect_type']}"
        rows.append((f"{head} images (real held-out / generated)", f"{item['n_real_held_out']} / {item['n_generated']}"))
        k = item.get("kid")
        if k is not None:
            rows.append((f"{head} KID x 10^3 (mean ± std)", (
                f"{k['mean_x1e3']:.3f} ± {k['std_x1e3']:.3f} (subset size {k['subset_size']}, {k['subsets']} subsets)"
                if k["available"] else f"unavailable: {k['reason']}")))
        ic = item.get("ic_lpips")
        if ic is not None:
            # DFMGAN's two values: the headline counts clusters without a pair as 0, the other leaves them out
            rows.append((f"{head} IC-LPIPS", (
                f"{ic['value']:.4f} (clusters without a pair left out: {ic['value_excluding_singletons']:.4f})"
                if ic["available"] else f"unavailable: {ic['reason']}")))
    for metric, values in metrics.get("downstream_comparison", {}).items():
        # the inspection models trained on the real references only, on both, and on the synthetic images only
        shown = " / ".join(_fmt(values.get(n)) for n in ("real", "real+synthetic", "synthetic"))
        gain = values.get("gain real+synthetic over real")
        rows.append((f"{metric}: real / real+synthetic / synthetic",
                     f"{shown} (gain of real+synthetic over real: {'n/a' if gain is None else f'{gain:+.4f}'})"))
    cls = metrics.get("downstream", {}).get("classify")
    if cls and "accuracy" in cls:
        rows.append(("classify accuracy (synthetic)", _fmt(cls["accuracy"])))
    loc = metrics.get("downstream", {}).get("localize")
    if loc and "image" in loc:
        for level in ("image", "pixel"):
            s = loc[level]
            rows.append((f"localize {level} AUROC / AP / F1-max",
                         f"{_fmt(s['auroc'])} / {_fmt(s['ap'])} / {_fmt(s['f1_max'])}"))
        if loc.get("pro") is not None:
            rows.append(("localize PRO (FPR <= 0.3)", _fmt(loc["pro"])))
    return rows


def _sections(metrics: dict[str, Any]) -> list[tuple[str, list[tuple[str, str]]]]:
    sections = [("Summary", _summary_rows(metrics))]
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
    sections.append(("Settings", _rows(metrics.get("settings", {}))))
    return sections


def write_report(output: str | Path, metrics: dict[str, Any], pictures: dict[str, Image.Image],
                 note: str | None = None) -> dict[str, Path]:
    """Write metrics.json, report.html, report.md and the pictures (PNG) into `output`; `note` heads the report."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / METRICS_NAME, metrics)
    encoded = {}
    for name, picture in pictures.items():
        data = _png_bytes(picture)
        atomic_write(output / f"{name}.png", lambda p, d=data: p.write_bytes(d))
        encoded[name] = base64.b64encode(data).decode("ascii")

    title = "defectfill evaluation"
    parts = [f"<p class='note'>{html.escape(note)}</p>"] if note else []
    md = [f"# {title}", ""] + ([f"> {note}", ""] if note else [])
    for heading, rows in _sections(metrics):
        parts.append(f"<h2>{html.escape(heading)}</h2><table><tr><th>metric</th><th>value</th></tr>")
        parts.extend(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows)
        parts.append("</table>")
        md += [f"## {heading}", "", "| metric | value |", "| --- | --- |"]
        md += [f"| {k} | {v.replace('|', '/')} |" for k, v in rows]
        md.append("")
    for name, data in encoded.items():
        parts.append(f"<h2>{html.escape(name)}</h2><img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>")
        md += [f"## {name}", "", f"![{name}]({name}.png)", ""]
    write_text(output / REPORT_HTML, html_page(title, parts))
    write_text(output / REPORT_MD, "\n".join(md) + "\n")
    return {"metrics": output / METRICS_NAME, "html": output / REPORT_HTML, "markdown": output / REPORT_MD}


# --------------------------------------------------------------------------- the whole run


def write_run_report(output: Path, rows: list[dict[str, str]], sections: list[dict[str, Any]],
                     downstream: dict[str, str], note: str | None, seconds: float) -> None:
    """report.html and report.md of a whole `run`.

    rows: one per defect type, the table's columns by name ("run" and "evaluation" are paths relative
    to `output`, linked; "evaluation" may be None when no report was written). sections: per type a
    heading, its sample grid and its generation preview (paths). downstream: category -> report path
    or what happened instead.
    """
    head = ["category", "defect type", "status", "references", "held out", "generated", "KID x10^3 (± std)",
            "IC-LPIPS", "run", "evaluation"]
    parts, md = [], ["# defectfill run", ""]
    if note:
        parts.append(f"<p class='note'>{html.escape(note)}</p>")
        md += [f"> {note}", ""]
    parts.append("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>")
    for row in rows:
        cells = [html.escape(row[h]) for h in head[:8]]
        cells.append(f"<a href='{html.escape(row['run'])}'>{html.escape(row['run'])}</a>")
        cells.append(f"<a href='{html.escape(row['evaluation'])}'>report</a>" if row["evaluation"] else "-")
        parts.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    parts.append("</table>")
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(row[h] or "-" for h in head) + " |" for row in rows]
    if downstream:
        parts.append("<h2>Downstream inspection models</h2><ul>")
        md += ["", "## Downstream inspection models", ""]
        for cat, where in downstream.items():
            link = os.path.relpath(where, output) if where.endswith(".html") else None
            parts.append(f"<li>{html.escape(cat)}: " + (f"<a href='{html.escape(link)}'>report</a>" if link
                                                         else html.escape(where)) + "</li>")
            md.append(f"- {cat}: {link or where}")
        parts.append("</ul>")
    parts.append(f"<p>{len(rows)} defect type(s) in {seconds:.0f} s. Settings: run.json and runs/*/config.json.</p>")
    for section in sections:
        grid, preview = section["grid"], section["preview"]
        parts.append(f"<h2>{html.escape(section['title'])}</h2>")
        parts.append(img_tag(grid, "real held-out vs generated") or "<p>no sample grid</p>")
        if preview.is_file():
            parts.append("<h3>Low-Fidelity Selection (source | mask | chosen | other candidates)</h3>")
            parts.append(img_tag(preview, "generation preview"))
        md += ["", f"## {section['title']}", "",
               f"![samples]({os.path.relpath(grid, output)})" if grid.is_file() else "no sample grid"]
    write_text(output / REPORT_HTML, html_page("defectfill run", parts))
    write_text(output / REPORT_MD, "\n".join(md) + "\n")
