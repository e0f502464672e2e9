"""`defectfill run`: train, generate and evaluate every defect type of one or more categories.

Only orchestration lives here; each stage is the stage command's own code
(`train.train`, `generate.run_generate`, `evaluate.evaluate`). A stage whose
outputs are complete is skipped, so a killed `run` continues where it stopped.

    <output>/
      runs/<category>-<type>/        training run (LoRA, config, split, checkpoints)
      runs/<category>/               with --one-model-per-object: the category's one run, every type's token
      generated/<category>-<type>/   generated images of that type (MVTec layout, manifest, preview)
      synth/                         every generated image, one MVTec-layout dataset (hard links)
      eval/<category>-<type>/        KID, IC-LPIPS and their report
      eval/<category>-downstream/    the inspection models (with --downstream)
      report.html, report.md, summary.json
"""

from __future__ import annotations

import argparse
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

from defectfill.atomic import write_json
from defectfill.checkpoint import list_checkpoints
from defectfill.config import RunConfig
from defectfill.data import make_split, open_layout
from defectfill.errors import DefectFillError
from defectfill.folders import claim_folder, folder_lock
from defectfill.model import LORA_WEIGHTS_NAME
from defectfill.report import write_run_report

log = logging.getLogger("defectfill.run")
RUN_SETTINGS = "run.json"  # the RunConfig of the run, every flat setting


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
            pairs.append((cat, layout.canonical_defect_type(cat, t)))  # VisA: folders use the underscore form
    return pairs


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


def _assemble_synth(config: RunConfig, output: Path, results: list[TypeResult]) -> Path:
    """One MVTec-layout dataset of every generated image and its defect-free sources (hard links; copies
    where links fail)."""
    synth = output / "synth"
    for r in results:
        gen = config.folders(r.category, r.defect_type)["generated"] / r.category
        good = gen / "train" / "good"
        if good.is_dir():  # the sources of every type, in one train/good
            dst_good = synth / r.category / "train" / "good"
            dst_good.mkdir(parents=True, exist_ok=True)
            for src in sorted(good.iterdir()):
                if not (dst_good / src.name).exists():
                    _link(src, dst_good / src.name)
        for sub in ("test", "ground_truth"):
            src_dir = gen / sub / r.defect_type
            if not src_dir.is_dir():
                continue
            dst_dir = synth / r.category / sub / r.defect_type
            if dst_dir.exists():
                shutil.rmtree(dst_dir)
            dst_dir.mkdir(parents=True)
            for src in sorted(src_dir.iterdir()):
                _link(src, dst_dir / src.name)
    return synth


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def process_type(cat: str, defect_type: str, config: RunConfig, position: str,
                 evaluate_kwargs: dict[str, Any], object_types: list[str] | None = None) -> TypeResult:
    """Train, generate and evaluate one defect type; each stage skipped when already complete.

    One model per object (`object_types`: the category's planned types): the first type of the category
    trains the category's run, the others find it complete."""
    import defectfill.train
    from defectfill.evaluate import evaluate
    from defectfill.generate import run_generate

    result = TypeResult(cat, defect_type)
    folders = config.folders(cat, defect_type)
    stage = "train"
    try:
        train_config = config.train_config(cat, defect_type, object_types)
        state = _train_state(folders["run"], train_config.steps)
        if state == "complete":
            result.stages["train"] = "skipped"
        else:
            print(f"{position} {cat}/{train_config.defect_type}: train ({train_config.steps} steps"
                  f"{', resuming' if state == 'partial' else ''})")
            train_config.resume = "latest" if state == "partial" else None
            defectfill.train.train(train_config)
            result.stages["train"] = "ran"

        stage = "generate"
        generate_config = config.generate_config(cat, defect_type)
        if _manifest_count(folders["generated"]) >= generate_config.count:
            result.stages["generate"] = "skipped"
        else:
            print(f"{position} {cat}/{defect_type}: generate {generate_config.count} images "
                  f"({generate_config.candidates} candidates each)")
            run_generate(generate_config)
            result.stages["generate"] = "ran"
        result.n_generated = _manifest_count(folders["generated"])

        stage = "evaluate"
        if _eval_complete(folders["eval"], folders["generated"]):
            result.stages["evaluate"] = "skipped"
        else:
            print(f"{position} {cat}/{defect_type}: evaluate (KID, IC-LPIPS)")
            evaluate(config.evaluate_config(cat, defect_type), **evaluate_kwargs)
            result.stages["evaluate"] = "ran"
        _read_metrics(result, folders["eval"] / "metrics.json")
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


def print_plan(layout, pairs: list[tuple[str, str]], config: RunConfig) -> None:
    """What `run` would do, read from the dataset and the output folder only (no model is loaded)."""
    print(f"plan for {config.output} (dataset {layout.root}, layout {layout.name})")
    header = f"{'category/type':28} {'refs':>4} {'held-out':>8} {'good':>5} {'train steps':>12} {'to generate':>12}"
    print(header)
    total_steps = 0
    counted: set[Path] = set()  # one model per object: a category's run trains once
    for cat, t in pairs:
        folders = config.folders(cat, t)
        steps = config.train.steps
        split = make_split(layout, cat, t)
        checkpoints = list_checkpoints(folders["run"])
        done = int(checkpoints[-1].name.split("-")[1]) if checkpoints else 0
        steps_left = 0 if _train_state(folders["run"], steps) == "complete" or folders["run"] in counted \
            else steps - done
        counted.add(folders["run"])
        total_steps += steps_left
        to_generate = max(0, config.generate.count - _manifest_count(folders["generated"]))
        print(f"{cat + '/' + t:28} {len(split.reference):>4} {len(split.held_out):>8} "
              f"{len(layout.good_images(cat)):>5} {steps_left:>12} {to_generate:>12}")
    models = f" in {len(counted)} model(s), one per object" if config.one_model_per_object else ""
    print(f"{len(pairs)} defect type(s){models}, {total_steps} training steps in all, batch {config.train.batch_size}, "
          f"{config.generate.candidates} candidates per image; downstream: {config.downstream}")


def run_all(config: RunConfig, feature_extractor: nn.Module | None = None, distance: Any = None,
            note: str | None = None) -> list[TypeResult]:
    """The whole job; returns one result per defect type (failures included) after writing the report.

    `feature_extractor` (KID) and `distance` (IC-LPIPS) replace the standard networks (offline demos,
    tests); `note` is shown at the top of the report.
    """
    config.validate()  # every stage's settings, before any work
    output = Path(config.output).expanduser()
    layout = open_layout(config.train.data, config.train.layout)
    pairs = plan_types(layout, config.selected_categories(), config.selected_defect_types())
    if config.dry_run:
        print_plan(layout, pairs, config)
        return []
    claim_folder(output, "run")  # an empty or new folder, or one `run` wrote: never a foreign one
    with folder_lock(output, "run"):  # one writer at a time
        return _run_types(config, output, pairs, {"feature_extractor": feature_extractor, "distance": distance,
                                                  "note": note})


def _run_types(config: RunConfig, output: Path, pairs: list[tuple[str, str]],
               evaluate_kwargs: dict[str, Any]) -> list[TypeResult]:
    """Every type's stages, the combined dataset, the downstream models and the report (in a claimed folder)."""
    from defectfill.evaluate import evaluate

    write_json(output / RUN_SETTINGS, config.to_dict())
    handler = logging.FileHandler(output / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.getLogger("defectfill").addHandler(handler)
    started = time.time()
    results: list[TypeResult] = []
    try:
        object_types = {cat: [t for c, t in pairs if c == cat] for cat, _ in pairs}
        for i, (cat, t) in enumerate(pairs):
            results.append(process_type(cat, t, config, f"[{i + 1}/{len(pairs)}]", evaluate_kwargs,
                                        object_types[cat] if config.one_model_per_object else None))
        synth = _assemble_synth(config, output, [r for r in results if r.n_generated])
        downstream: dict[str, str] = {}
        if config.downstream != "none":
            for cat in sorted({c for c, _ in pairs}):
                cat_results = [r for r in results if r.category == cat]
                if any(r.status != "done" for r in cat_results):
                    downstream[cat] = "not run: a defect type of this category failed"
                    continue
                eval_dir = output / "eval" / f"{cat}-downstream"
                print(f"downstream {config.downstream} on {cat}")
                try:
                    evaluate(config.downstream_config(cat, synth, eval_dir), note=evaluate_kwargs["note"])
                    downstream[cat] = str(eval_dir / "report.html")
                except DefectFillError as exc:
                    downstream[cat] = f"failed: {exc}"
        _write_report(config, output, results, downstream, evaluate_kwargs["note"], time.time() - started)
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


def _write_report(config: RunConfig, output: Path, results: list[TypeResult], downstream: dict[str, str],
                  note: str | None, seconds: float) -> None:
    """summary.json, report.html and report.md of the whole run."""
    write_json(output / "summary.json", {
        "results": [asdict(r) for r in results], "downstream": downstream, "seconds": round(seconds, 1),
        "note": note,
    })

    def num(v: float | None, fmt: str) -> str:
        return format(v, fmt) if v is not None else "-"

    rows, sections = [], []
    for r in results:
        folders = config.folders(r.category, r.defect_type)
        eval_report = folders["eval"] / "report.html"
        kid = f"{num(r.kid_x1e3, '.2f')} ± {num(r.kid_std_x1e3, '.2f')}" if r.kid_x1e3 is not None else "-"
        rows.append({
            "category": r.category, "defect type": r.defect_type,
            "status": r.status if not r.error else f"{r.status}: {r.error}",
            "references": str(r.n_references), "held out": str(r.n_held_out), "generated": str(r.n_generated),
            "KID x10^3 (± std)": kid, "IC-LPIPS": num(r.ic_lpips, ".3f"),
            "run": os.path.relpath(folders["run"], output),
            # a failed type may have no evaluation: no link to a report that does not exist
            "evaluation": os.path.relpath(eval_report, output) if eval_report.is_file() else None,
        })
        sections.append({"title": f"{r.category} / {r.defect_type}",
                         "grid": folders["eval"] / f"samples_{r.category}_{r.defect_type}.png",
                         "preview": folders["generated"] / "preview.png"})
    write_run_report(output, rows, sections, downstream, note, seconds)


# --------------------------------------------------------------------------- command


def run_command(args: argparse.Namespace) -> int:
    """`defectfill run`: the flags (and --config file) as a RunConfig, then the whole job."""
    results = run_all(RunConfig.from_args(args))
    return 1 if any(r.status != "done" for r in results) else 0
