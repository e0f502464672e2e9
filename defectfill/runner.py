"""`defectfill run`: train, generate and evaluate every defect type of one or more categories.

Only orchestration lives here; each stage is the stage command's own code
(`train.train`, `generate.run_generate`, `evaluate.evaluate`). A stage whose
outputs are complete is skipped, so a killed `run` continues where it stopped.

    <output>/
      runs/<category>-<type>/        training run (LoRA, config, split, checkpoints)
      generated/<category>-<type>/   generated images of that type (MVTec layout, manifest, preview)
      synth/                         every generated image, one MVTec-layout dataset (hard links)
      eval/<category>-<type>/        KID, IC-LPIPS and their report
      eval/<category>-downstream/    the inspection models (with --downstream)
      report.html, report.md, summary.json
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import logging
import os
import shutil
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn

from defectfill.checkpoint import list_checkpoints
from defectfill.config import TrainConfig, add_train_arguments, make_config
from defectfill.data import make_split, open_layout
from defectfill.errors import DefectFillError
from defectfill.io import write_json, write_text
from defectfill.model import LORA_WEIGHTS_NAME

log = logging.getLogger("defectfill.run")


@dataclass
class RunOptions:
    """What `run` adds to the training settings."""

    categories: list[str] | None = None  # None: every category of the dataset
    defect_types: list[str] | None = None  # None: every type of each category
    count: int = 100  # generated images per defect type
    candidates: int = 8
    generate_steps: int = 50
    guidance: float = 7.5
    masks: str = "held-out"
    downstream: str = "none"
    downstream_epochs: int = 20
    downstream_image_size: int = 256
    pretrained: bool = True  # ImageNet backbones of the downstream models
    kid_subsets: int = 100
    lpips_size: int = 256
    dry_run: bool = False
    # Offline networks for the demo (untrained: the pipeline runs, the numbers mean nothing).
    lpips_random_backbone: bool = False
    feature_extractor: nn.Module | None = None
    distance: Any = None
    note: str | None = None  # shown at the top of the report


@dataclass
class TypeResult:
    category: str
    defect_type: str
    status: str = "pending"  # done | failed
    stages: dict[str, str] = field(default_factory=dict)  # stage -> ran | skipped | failed
    error: str | None = None
    n_references: int = 0
    n_held_out: int = 0
    n_generated: int = 0
    kid_x1e3: float | None = None
    kid_std_x1e3: float | None = None
    ic_lpips: float | None = None


def plan_types(layout, categories: list[str] | None, defect_types: list[str] | None) -> list[tuple[str, str]]:
    """(category, type) pairs to process, with clear errors for unknown names."""
    cats = categories or layout.categories()
    if not cats:
        raise DefectFillError(f"{layout.root}: no categories found; pass --category.")
    pairs = []
    for cat in cats:
        layout.check_category(cat)
        types = defect_types or layout.defect_types(cat)
        for t in types:
            layout.check_defect_type(cat, t)
            pairs.append((cat, t))
    return pairs


def _paths(output: Path, cat: str, defect_type: str) -> dict[str, Path]:
    key = f"{cat}-{defect_type}"
    return {"run": output / "runs" / key, "generated": output / "generated" / key, "eval": output / "eval" / key}


def _train_state(run_dir: Path, steps: int) -> str:
    """new | partial | complete, from what the run folder holds."""
    checkpoints = list_checkpoints(run_dir)
    done = int(checkpoints[-1].name.split("-")[1]) if checkpoints else 0
    if (run_dir / LORA_WEIGHTS_NAME).is_file() and done >= steps:
        return "complete"
    return "partial" if checkpoints else "new"


def _manifest_count(gen_dir: Path) -> int:
    path = gen_dir / "manifest.jsonl"
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0


def _eval_complete(eval_dir: Path, gen_dir: Path) -> bool:
    report, manifest = eval_dir / "report.html", gen_dir / "manifest.jsonl"
    return report.is_file() and manifest.is_file() and report.stat().st_mtime >= manifest.stat().st_mtime


def _generate_args(run_dir: Path, gen_dir: Path, opts: RunOptions, seed: int) -> argparse.Namespace:
    from defectfill.generate import add_generate_arguments

    parser = argparse.ArgumentParser()
    add_generate_arguments(parser)
    argv = ["--run", str(run_dir), "--output", str(gen_dir), "--count", str(opts.count),
            "--candidates", str(opts.candidates), "--steps", str(opts.generate_steps),
            "--guidance", str(opts.guidance), "--masks", opts.masks, "--seed", str(seed)]
    if opts.lpips_random_backbone:
        argv.append("--lpips-random-backbone")
    return parser.parse_args(argv)


def _assemble_synth(output: Path, results: list[TypeResult]) -> Path:
    """One MVTec-layout dataset of every generated image (hard links; copies where links fail)."""
    synth = output / "synth"
    for r in results:
        gen = _paths(output, r.category, r.defect_type)["generated"] / r.category
        for sub in ("test", "ground_truth"):
            src_dir = gen / sub / r.defect_type
            if not src_dir.is_dir():
                continue
            dst_dir = synth / r.category / sub / r.defect_type
            if dst_dir.exists():
                shutil.rmtree(dst_dir)
            dst_dir.mkdir(parents=True)
            for src in sorted(src_dir.iterdir()):
                try:
                    os.link(src, dst_dir / src.name)
                except OSError:
                    shutil.copy2(src, dst_dir / src.name)
    return synth


def _evaluate_kwargs(opts: RunOptions, config: TrainConfig) -> dict[str, Any]:
    return {
        "feature_extractor": opts.feature_extractor, "distance": opts.distance, "kid_subsets": opts.kid_subsets,
        "lpips_size": min(opts.lpips_size, config.resolution),
    }


def process_type(cat: str, defect_type: str, settings: dict[str, Any], opts: RunOptions, output: Path,
                 position: str) -> TypeResult:
    """Train, generate and evaluate one defect type; each stage skipped when already complete."""
    from defectfill.evaluate import evaluate
    from defectfill.generate import run_generate
    from defectfill.train import train

    result = TypeResult(cat, defect_type)
    paths = _paths(output, cat, defect_type)
    stage = "train"
    try:
        config = make_config({**settings, "category": cat, "defect_type": defect_type, "output": str(paths["run"])})
        state = _train_state(paths["run"], config.steps)
        if state == "complete":
            result.stages["train"] = "skipped"
        else:
            print(f"{position} {cat}/{defect_type}: train ({config.steps} steps{', resuming' if state == 'partial' else ''})")
            config.resume = "latest" if state == "partial" else None
            train(config)
            result.stages["train"] = "ran"

        stage = "generate"
        if _manifest_count(paths["generated"]) >= opts.count:
            result.stages["generate"] = "skipped"
        else:
            print(f"{position} {cat}/{defect_type}: generate {opts.count} images ({opts.candidates} candidates each)")
            run_generate(_generate_args(paths["run"], paths["generated"], opts, config.seed))
            result.stages["generate"] = "ran"
        result.n_generated = _manifest_count(paths["generated"])

        stage = "evaluate"
        if _eval_complete(paths["eval"], paths["generated"]):
            result.stages["evaluate"] = "skipped"
        else:
            print(f"{position} {cat}/{defect_type}: evaluate (KID, IC-LPIPS)")
            evaluate(paths["generated"], paths["eval"], run=paths["run"], **_evaluate_kwargs(opts, config))
            result.stages["evaluate"] = "ran"
        _read_metrics(result, paths["eval"] / "metrics.json")
        result.status = "done"
    except DefectFillError as exc:
        result.status, result.error = "failed", f"{stage}: {exc}"
        result.stages[stage] = "failed"
    except Exception as exc:  # noqa: BLE001 - one type's crash must not lose the others' results
        result.status, result.error = "failed", f"{stage}: {type(exc).__name__}: {exc}"
        result.stages[stage] = "failed"
        log.error("%s/%s %s failed:\n%s", cat, defect_type, stage, traceback.format_exc())
    return result


def _read_metrics(result: TypeResult, path: Path) -> None:
    metrics = json.loads(path.read_text())
    for item in metrics.get("image_metrics", []):
        if item.get("defect_type") != result.defect_type:
            continue
        result.n_references, result.n_held_out = item.get("n_references", 0), item.get("n_real_held_out", 0)
        kid = item.get("kid") or {}
        if kid.get("available"):
            result.kid_x1e3, result.kid_std_x1e3 = kid["mean_x1e3"], kid["std_x1e3"]
        ic = item.get("ic_lpips") or {}
        if isinstance(ic, dict) and ic.get("available", True) and ic.get("value") is not None:
            result.ic_lpips = ic["value"]


def print_plan(layout, pairs: list[tuple[str, str]], settings: dict[str, Any], opts: RunOptions, output: Path) -> None:
    """What `run` would do, read from the dataset and the output folder only (no model is loaded)."""
    print(f"plan for {output} (dataset {layout.root}, layout {layout.name})")
    header = f"{'category/type':28} {'refs':>4} {'held-out':>8} {'good':>5} {'train steps':>12} {'to generate':>12}"
    print(header)
    total_steps = 0
    for cat, t in pairs:
        paths = _paths(output, cat, t)
        config = make_config({**settings, "category": cat, "defect_type": t, "output": str(paths["run"])})
        split = make_split(layout, cat, t)
        checkpoints = list_checkpoints(paths["run"])
        done = int(checkpoints[-1].name.split("-")[1]) if checkpoints else 0
        steps_left = 0 if _train_state(paths["run"], config.steps) == "complete" else config.steps - done
        total_steps += steps_left
        to_generate = max(0, opts.count - _manifest_count(paths["generated"]))
        print(f"{cat + '/' + t:28} {len(split.reference):>4} {len(split.held_out):>8} "
              f"{len(layout.good_images(cat)):>5} {steps_left:>12} {to_generate:>12}")
    print(f"{len(pairs)} defect type(s), {total_steps} training steps in all, batch {settings.get('batch_size', 4)}, "
          f"{opts.candidates} candidates per image; downstream: {opts.downstream}")


def run_all(settings: dict[str, Any], opts: RunOptions, output: str | Path) -> list[TypeResult]:
    """The whole job; returns one result per defect type (failures included) after writing the report."""
    from defectfill.evaluate import evaluate
    from defectfill.metrics.downstream import DownstreamSettings

    output = Path(output).expanduser()
    if settings.get("resume"):
        raise DefectFillError("--resume is not needed with `run`: finished stages are skipped and training resumes by itself.")
    make_config({**settings, "category": "x", "defect_type": "x", "output": str(output)})  # settings check
    if opts.count < 1:
        raise DefectFillError(f"--count {opts.count}: must be at least 1.")
    layout = open_layout(settings["data"], settings.get("layout", "auto"))
    pairs = plan_types(layout, opts.categories, opts.defect_types)
    if opts.dry_run:
        print_plan(layout, pairs, settings, opts, output)
        return []
    if output.exists() and not output.is_dir():
        raise DefectFillError(f"{output}: exists and is not a folder. Choose another --output.")
    output.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(output / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.getLogger("defectfill").addHandler(handler)
    started = time.time()
    results: list[TypeResult] = []
    try:
        for i, (cat, t) in enumerate(pairs):
            results.append(process_type(cat, t, settings, opts, output, f"[{i + 1}/{len(pairs)}]"))
        synth = _assemble_synth(output, [r for r in results if r.n_generated])
        downstream: dict[str, str] = {}
        if opts.downstream != "none":
            for cat in sorted({c for c, _ in pairs}):
                cat_results = [r for r in results if r.category == cat]
                if any(r.status != "done" for r in cat_results):
                    downstream[cat] = "not run: a defect type of this category failed"
                    continue
                eval_dir = output / "eval" / f"{cat}-downstream"
                print(f"downstream {opts.downstream} on {cat}")
                ds = DownstreamSettings(epochs=opts.downstream_epochs, image_size=opts.downstream_image_size,
                                        pretrained=opts.pretrained)
                try:
                    evaluate(synth, eval_dir, data=settings["data"], category=cat, layout=settings.get("layout", "auto"),
                             downstream=opts.downstream, compute_kid=False, compute_ic_lpips=False, settings=ds)
                    downstream[cat] = str(eval_dir / "report.html")
                except DefectFillError as exc:
                    downstream[cat] = f"failed: {exc}"
        write_run_report(output, results, downstream, opts, time.time() - started)
    finally:
        logging.getLogger("defectfill").removeHandler(handler)
        handler.close()
    print_summary(results, output)
    return results


def print_summary(results: list[TypeResult], output: Path) -> None:
    print(f"\n{'category/type':28} {'status':7} {'images':>6} {'KID x1e3':>10} {'IC-LPIPS':>9}")
    for r in results:
        kid = f"{r.kid_x1e3:.2f}" if r.kid_x1e3 is not None else "-"
        ic = f"{r.ic_lpips:.3f}" if r.ic_lpips is not None else "-"
        print(f"{r.category + '/' + r.defect_type:28} {r.status:7} {r.n_generated:>6} {kid:>10} {ic:>9}")
        if r.error:
            print(f"    {r.error}")
    print(f"\nreport: {output / 'report.html'}")


def _img_tag(path: Path, alt: str) -> str:
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"


def write_run_report(output: Path, results: list[TypeResult], downstream: dict[str, str], opts: RunOptions,
                     seconds: float) -> None:
    """report.html (self-contained), report.md and summary.json of the whole run."""
    write_json(output / "summary.json", {
        "results": [asdict(r) for r in results], "downstream": downstream, "seconds": round(seconds, 1),
        "note": opts.note,
    })

    def num(v: float | None, fmt: str) -> str:
        return format(v, fmt) if v is not None else "-"

    head = ["category", "defect type", "status", "references", "held out", "generated", "KID x10^3 (± std)",
            "IC-LPIPS", "run", "evaluation"]
    rows = []
    for r in results:
        p = _paths(output, r.category, r.defect_type)
        kid = f"{num(r.kid_x1e3, '.2f')} ± {num(r.kid_std_x1e3, '.2f')}" if r.kid_x1e3 is not None else "-"
        status = r.status if not r.error else f"{r.status}: {r.error}"
        rows.append([r.category, r.defect_type, status, str(r.n_references), str(r.n_held_out), str(r.n_generated),
                     kid, num(r.ic_lpips, ".3f"), os.path.relpath(p["run"], output),
                     os.path.relpath(p["eval"] / "report.html", output)])
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>defectfill run</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1300px}table{border-collapse:collapse}"
             "td,th{border:1px solid #bbb;padding:3px 8px}th{background:#eee}.note{background:#fff3cd;padding:8px}"
             "img{image-rendering:pixelated;max-width:100%}</style></head><body><h1>defectfill run</h1>"]
    md = ["# defectfill run", ""]
    if opts.note:
        parts.append(f"<p class='note'>{html.escape(opts.note)}</p>")
        md += [f"> {opts.note}", ""]
    parts.append("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>")
    for row in rows:
        cells = [html.escape(c) for c in row[:8]]
        cells += [f"<a href='{html.escape(row[8])}'>{html.escape(row[8])}</a>",
                  f"<a href='{html.escape(row[9])}'>report</a>"]
        parts.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    parts.append("</table>")
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    if downstream:
        parts.append("<h2>Downstream inspection models</h2><ul>")
        md += ["", "## Downstream inspection models", ""]
        for cat, where in downstream.items():
            link = os.path.relpath(where, output) if where.endswith(".html") else None
            parts.append(f"<li>{html.escape(cat)}: " + (f"<a href='{html.escape(link)}'>report</a>" if link
                                                         else html.escape(where)) + "</li>")
            md.append(f"- {cat}: {link or where}")
        parts.append("</ul>")
    parts.append(f"<p>{len(results)} defect type(s) in {seconds:.0f} s. Settings: runs/*/config.json.</p>")
    for r in results:
        p = _paths(output, r.category, r.defect_type)
        grid = p["eval"] / f"samples_{r.category}_{r.defect_type}.png"
        preview = p["generated"] / "preview.png"
        parts.append(f"<h2>{html.escape(r.category)} / {html.escape(r.defect_type)}</h2>")
        parts.append(_img_tag(grid, "real held-out vs generated") or "<p>no sample grid</p>")
        if preview.is_file():
            parts.append("<h3>Low-Fidelity Selection (source | mask | chosen | other candidates)</h3>")
            parts.append(_img_tag(preview, "generation preview"))
        md += ["", f"## {r.category} / {r.defect_type}", "",
               f"![samples]({os.path.relpath(grid, output)})" if grid.is_file() else "no sample grid"]
    parts.append("</body></html>")
    write_text(output / "report.html", "\n".join(parts))
    write_text(output / "report.md", "\n".join(md) + "\n")


# --------------------------------------------------------------------------- command


def _split_list(value: str | None) -> list[str] | None:
    if value is None or value == "all":
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    add_train_arguments(parser)  # --category and --defect-type select one; the lists below select several
    parser.add_argument("--categories", help="comma-separated categories, or 'all'")
    parser.add_argument("--defect-types", help="comma-separated defect types (default: every type)")
    parser.add_argument("--count", type=int, default=100, help="generated images per defect type")
    parser.add_argument("--candidates", type=int, default=8, help="Low-Fidelity Selection candidates per image")
    parser.add_argument("--generate-steps", type=int, default=50, help="sampling steps of generation")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance of generation")
    parser.add_argument("--masks", default="held-out", help="generation masks: held-out, shapes or a folder")
    parser.add_argument("--downstream", default="none", choices=["none", "classify", "localize", "both"],
                        help="also train and test the inspection models per category")
    parser.add_argument("--downstream-epochs", type=int, default=20, help="epochs of the downstream models")
    parser.add_argument("--dry-run", action="store_true", help="print the plan; load no model")


def run_command(args: argparse.Namespace) -> int:
    opts = RunOptions(
        categories=_split_list(args.categories) if args.categories else ([args.category] if getattr(args, "category", None) else None),
        defect_types=_split_list(args.defect_types) if args.defect_types else (
            [args.defect_type] if getattr(args, "defect_type", None) else None),
        count=args.count, candidates=args.candidates, generate_steps=args.generate_steps, guidance=args.guidance,
        masks=args.masks, downstream=args.downstream, downstream_epochs=args.downstream_epochs, dry_run=args.dry_run,
    )
    run_keys = {"categories", "defect_types", "count", "candidates", "generate_steps", "guidance", "masks",
                "downstream", "downstream_epochs", "dry_run", "command", "func", "config", "category", "defect_type"}
    settings = {k: v for k, v in vars(args).items() if k not in run_keys}
    if args.config:
        from defectfill.config import load_yaml_settings

        settings = {**load_yaml_settings(args.config), **settings}
    settings.setdefault("mixed_precision", "auto")
    if not settings.get("data") or not settings.get("output"):
        raise DefectFillError("missing required setting(s): --data and --output.")
    output = settings.pop("output")
    results = run_all(settings, opts, output)
    return 1 if any(r.status != "done" for r in results) else 0
