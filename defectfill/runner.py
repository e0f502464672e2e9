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
      results/<category>-<type>.json each type's result as it finished (what --report-only reads)
      report.html, report.md, summary.json

Each type is processed under its own lock (`results/.<category>-<type>.lock`), so two jobs never work on one
type; the run folder's lock is exclusive for a whole run and for --report-only, shared among the --shard jobs
(which write no report), and never taken by a Ray task, whose driver holds it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import time
import traceback
from dataclasses import asdict, dataclass, field, fields
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
RUN_SETTINGS = "run.json"  # the RunConfig of the run, every flat setting but those of the invocation
RESULTS = "results"  # results/<category>-<type>.json: each type's TypeResult, as it finished


@dataclass
class TypeResult:
    category: str
    defect_type: str
    status: str = "pending"  # done | failed | missing (--report-only: no job has finished the type)
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


def shard_pairs(pairs: list[tuple[str, str]], shard: tuple[int, int] | None) -> list[tuple[str, str]]:
    """The pairs of --shard I/N: the plan sorted by (category, type), then every N-th from position I.

    The slices are disjoint and together the whole plan, whatever order the categories were listed in;
    round-robin spreads each category's types over the shards. Plan order is kept within a slice.
    """
    if shard is None:
        return pairs
    index, count = shard
    mine = set(sorted(pairs)[index - 1::count])
    return [p for p in pairs if p in mine]


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
                 evaluate_kwargs: dict[str, Any], lock_wait_s: float = 0,
                 object_types: list[str] | None = None) -> TypeResult:
    """Train, generate and evaluate one defect type; each stage skipped when already complete.

    Runs under the type's own lock, so a second job (an overlapping shard) is refused this type instead of
    writing beside it; the result is recorded in results/ for --report-only. The same function runs in a
    Ray task, which waits up to `lock_wait_s` for the lock: a retry may start before a shared file system
    has dropped the lock of the attempt whose node was lost. One model per object (`object_types`: the
    category's planned types): the first type of the category trains the category's run, the others find it
    complete.
    """
    results = Path(config.output).expanduser() / RESULTS
    results.mkdir(parents=True, exist_ok=True)
    key = config.type_key(cat, defect_type)
    deadline = time.monotonic() + lock_wait_s
    with contextlib.ExitStack() as stack:
        while True:
            try:
                stack.enter_context(folder_lock(results, f"run {cat}/{defect_type}", name=f".{key}.lock"))
                break
            except DefectFillError as exc:  # the other job records its own result
                if time.monotonic() >= deadline:
                    return TypeResult(cat, defect_type, status="failed", error=f"not run: {exc}")
                time.sleep(5)
        result = _process_type(cat, defect_type, config, position, evaluate_kwargs, object_types)
        record_result(config, result)
        return result


def record_result(config: RunConfig, result: TypeResult) -> None:
    write_json(Path(config.output).expanduser() / RESULTS / f"{config.type_key(result.category, result.defect_type)}.json",
               asdict(result))


def read_result(config: RunConfig, cat: str, defect_type: str) -> TypeResult:
    """The recorded result of a type (--report-only); status `missing` when no job has finished it."""
    path = Path(config.output).expanduser() / RESULTS / f"{config.type_key(cat, defect_type)}.json"
    if not path.is_file():
        return TypeResult(cat, defect_type, status="missing",
                          error="not run yet: no job has finished this type; rerun the --shard job that holds it "
                                "(or `defectfill run` without --report-only)")
    known = {f.name for f in fields(TypeResult)}
    try:
        data = json.loads(path.read_text())
        result = TypeResult(**{k: v for k, v in data.items() if k in known})
    except (OSError, ValueError, TypeError) as exc:
        return TypeResult(cat, defect_type, status="failed",
                          error=f"{path}: unreadable ({exc}); rerun the --shard job that holds this type")
    return result


def _process_type(cat: str, defect_type: str, config: RunConfig, position: str,
                  evaluate_kwargs: dict[str, Any], object_types: list[str] | None) -> TypeResult:
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
    tests); `note` is shown at the top of the report. With --shard I/N only that slice of the plan is
    processed and no report is written; --report-only writes it from the recorded results.
    """
    config.validate()  # every stage's settings, before any work
    output = Path(config.output).expanduser()
    layout = open_layout(config.train.data, config.train.layout)
    pairs = plan_types(layout, config.selected_categories(), config.selected_defect_types())
    shard = config.shard_slice()
    mine = shard_pairs(pairs, shard)
    if config.dry_run:
        if shard:
            print(f"shard {shard[0]}/{shard[1]}: {len(mine)} of the plan's {len(pairs)} defect type(s)")
        print_plan(layout, mine, config)
        return []
    if config.executor == "ray":
        from defectfill.ray_executor import import_ray

        import_ray()  # a missing extra is named before anything is written
    evaluate_kwargs = {"feature_extractor": feature_extractor, "distance": distance, "note": note}
    if config.report_only:
        return _report_only(config, output, pairs, evaluate_kwargs)
    claim_folder(output, "run")  # an empty or new folder, or one `run` wrote: never a foreign one
    # a whole run is the only writer; the shards of one job share the folder (each type has its own lock)
    holder = f"run --shard {shard[0]}/{shard[1]}" if shard else "run"
    with folder_lock(output, holder, shared=shard is not None), _executor(config) as executor:
        return _run_types(config, output, pairs, mine, evaluate_kwargs, executor)


def object_types_of(config: RunConfig, pairs: list[tuple[str, str]], cat: str) -> list[str] | None:
    """With --one-model-per-object, the planned types of `cat` (the category's one run trains them all)."""
    return [t for c, t in pairs if c == cat] if config.one_model_per_object else None


class LocalExecutor:
    """Each type in this process, one after another (the default)."""

    def types(self, config: RunConfig, pairs: list[tuple[str, str]],
              evaluate_kwargs: dict[str, Any]) -> list[TypeResult]:
        return [process_type(cat, t, config, f"[{i + 1}/{len(pairs)}]", evaluate_kwargs,
                             object_types=object_types_of(config, pairs, cat))
                for i, (cat, t) in enumerate(pairs)]

    def downstream(self, config: RunConfig, categories: list[str], synth: Path, note: str | None) -> dict[str, str]:
        return {cat: run_downstream(config, cat, synth, note) for cat in categories}


@contextlib.contextmanager
def _executor(config: RunConfig):
    if config.executor == "ray":
        from defectfill.ray_executor import RayExecutor  # Ray is an optional extra: imported only here

        with RayExecutor(config) as executor:
            yield executor
    else:
        yield LocalExecutor()


def run_downstream(config: RunConfig, cat: str, synth: Path, note: str | None) -> str:
    """The inspection models of one category on the combined dataset: their report, or why they failed."""
    from defectfill.evaluate import evaluate

    eval_dir = Path(config.output).expanduser() / "eval" / f"{cat}-downstream"
    print(f"downstream {config.downstream} on {cat}")
    try:
        evaluate(config.downstream_config(cat, synth, eval_dir), note=note)
        return str(eval_dir / "report.html")
    except DefectFillError as exc:
        return f"failed: {exc}"


@contextlib.contextmanager
def _run_log(output: Path):
    handler = logging.FileHandler(output / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.getLogger("defectfill").addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger("defectfill").removeHandler(handler)
        handler.close()


def _run_types(config: RunConfig, output: Path, pairs: list[tuple[str, str]], mine: list[tuple[str, str]],
               evaluate_kwargs: dict[str, Any], executor) -> list[TypeResult]:
    """Every type's stages, then (a whole run) the combined dataset, the downstream models and the report."""
    write_json(output / RUN_SETTINGS, config.recorded())
    started = time.time()
    with _run_log(output):
        results = executor.types(config, mine, evaluate_kwargs)
        shard = config.shard_slice()
        if shard is None:
            _finish(config, output, pairs, results, evaluate_kwargs["note"], time.time() - started, executor)
    print_summary(results, output, report=shard is None)
    if shard is not None:
        print(f"shard {shard[0]}/{shard[1]} finished its {len(mine)} defect type(s); once every shard has, write the "
              "report with the same command and --report-only instead of --shard.")
    return results


def _report_only(config: RunConfig, output: Path, pairs: list[tuple[str, str]],
                 evaluate_kwargs: dict[str, Any]) -> list[TypeResult]:
    """The combined dataset, the downstream models and the report from the results the jobs recorded."""
    if not (output / RUN_SETTINGS).is_file():
        raise DefectFillError(f"--report-only: {output} holds no run ({RUN_SETTINGS} is missing). Run `defectfill run` "
                              "(or its --shard jobs) with this --output first, or point --output at the run's folder.")
    claim_folder(output, "run")  # refuses a folder some other command wrote
    started = time.time()
    # exclusive: refused while a shard still writes here; Ray is joined only for the downstream models
    executor = _executor(config) if config.downstream != "none" else contextlib.nullcontext(LocalExecutor())
    with folder_lock(output, "run --report-only"), executor as executor, _run_log(output):
        results = [read_result(config, cat, t) for cat, t in pairs]
        _finish(config, output, pairs, results, evaluate_kwargs["note"], time.time() - started, executor)
    print_summary(results, output)
    return results


def _finish(config: RunConfig, output: Path, pairs: list[tuple[str, str]], results: list[TypeResult],
            note: str | None, seconds: float, executor) -> None:
    """synth/, the downstream models of each category whose types are all done, and the report."""
    started = time.time()
    synth = _assemble_synth(config, output, [r for r in results if r.n_generated])
    downstream: dict[str, str] = {}
    if config.downstream != "none":
        ready = []
        for cat in sorted({c for c, _ in pairs}):
            if any(r.status != "done" for r in results if r.category == cat):
                downstream[cat] = "not run: a defect type of this category failed or has not run"
            else:
                ready.append(cat)
        downstream.update(executor.downstream(config, ready, synth, note))
        downstream = {cat: downstream[cat] for cat in sorted(downstream)}
    _write_report(config, output, results, downstream, note, seconds + time.time() - started)


def print_summary(results: list[TypeResult], output: Path, report: bool = True) -> None:
    print(f"\n{'category/type':28} {'status':7} {'images':>6} {'KID x1e3':>10} {'IC-LPIPS':>9}")
    for r in results:
        kid = f"{r.kid_x1e3:.2f}" if r.kid_x1e3 is not None else "-"
        ic = f"{r.ic_lpips:.3f}" if r.ic_lpips is not None else "-"
        print(f"{r.category + '/' + r.defect_type:28} {r.status:7} {r.n_generated:>6} {kid:>10} {ic:>9}")
        if r.error:
            print(f"    {r.error}")
    if report:
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
