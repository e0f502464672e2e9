"""`defectfill run`: train, generate and evaluate every defect type of one or more categories.

Only orchestration lives here; each stage is the stage command's own code
(`train.trainer.train`, `generate.writer.run_generate`, `evaluate.evaluator.evaluate`), called for one defect
type by `process.process_type`. A stage whose outputs are complete is skipped, so a killed `run` continues
where it stopped. What it writes, the job folder, is `outputs.job_folder`.

Each type is processed under its own lock (in the job folder's results), so two jobs never work on one
type; the run folder's lock is exclusive for a whole run and for --report-only, shared among the --shard jobs
(which write no report), and never taken by a Ray task, whose driver holds it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch.nn as nn

from defectfill.config.stages import RunConfig
from defectfill.core.atomic import write_json
from defectfill.core.errors import DefectFillError
from defectfill.core.folders import claim_folder, folder_lock
from defectfill.data import make_split, open_layout
from defectfill.model.device import resolve_device
from defectfill.outputs.checkpoints import list_checkpoints
from defectfill.outputs.export import export, parse_formats
from defectfill.outputs.generated import (
    manifest_count,
    preview_path,
    read_manifest,
    row_file,
    selection_network,
    type_folders,
)
from defectfill.outputs.job_folder import RUN_SETTINGS, JobFolder, job_folder
from defectfill.outputs.report import KID_RELIABLE_N, UNTRAINED_LFS, sample_grid_name, write_run_report
from defectfill.run.figures import base_architecture, protocol_estimate
from defectfill.run.preflight import preflight
from defectfill.run.process import (
    TypeResult,
    _train_state,
    process_type,
    read_result,
    run_downstream,
)
from defectfill.run.ray_executor import RayExecutor, import_ray

log = logging.getLogger("defectfill.run")


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


def _assemble_synth(config: RunConfig, output: Path, results: list[TypeResult]) -> Path:
    """One MVTec-layout dataset of every generated image (hard links; copies where links fail), with defect-free
    images that leak nothing: the sources a defect was painted on are the backgrounds of test/<type>/, so they
    are in neither good folder. test/good: the dataset's own defect-free test images (MVTec's test/good, VisA's
    test normals), else every other unpainted defect-free image; train/good: the other unpainted ones.
    synth/split.json lists which image went where (`synth_good_split`)."""
    job = job_folder(config)
    synth = job.synth
    for r in results:
        gen = job.type_folders(r.category, r.defect_type).generated
        for src_dir, dst_dir in zip(type_folders(gen, r.category, r.defect_type),
                                    type_folders(synth, r.category, r.defect_type), strict=True):
            if not src_dir.is_dir():
                continue
            if dst_dir.exists():
                shutil.rmtree(dst_dir)
            dst_dir.mkdir(parents=True)
            for src in sorted(src_dir.iterdir()):
                _link(src, dst_dir / src.name)
    if results:
        layout = open_layout(config.train.data, config.train.layout, config.train.good_images)
        split = {}
        for cat in sorted({r.category for r in results}):
            painted = set()
            for r in results:
                if r.category == cat:
                    gen = job.type_folders(r.category, r.defect_type).generated
                    painted |= {str(row_file(gen, row["source_image"]).resolve()) for row in read_manifest(gen)
                                if row.get("source_image")}
            split[cat] = synth_good_split(layout.good_images(cat), layout.good_test_images(cat), painted)
            for sub, names in (("train", split[cat]["train_good"]), ("test", split[cat]["test_good"])):
                folder = synth / cat / sub / "good"
                if folder.exists():
                    shutil.rmtree(folder)
                folder.mkdir(parents=True)
                for path in names:
                    _link(Path(path), folder / Path(path).name)
            if not split[cat]["train_good"]:
                log.warning("synth/%s/train/good is empty: a defect was painted on every defect-free image (%d), "
                            "so none is left that no test image shows. Generate fewer images (--count below %d) "
                            "or add defect-free images.", cat, len(split[cat]["painted_sources"]),
                            len(split[cat]["painted_sources"]))
        write_json(synth / "split.json", split)
    return synth


def synth_good_split(good: list[Path], good_test: list[Path], painted: set[str]) -> dict[str, list[str]]:
    """Which defect-free images go where in synth/: painted sources in neither folder; test/good the dataset's
    own good test images, else every other unpainted image (sorted by name); train/good the other unpainted."""
    unpainted = [p for p in sorted(good, key=lambda p: p.name) if str(p.resolve()) not in painted]
    sources = sorted(str(p) for p in good if str(p.resolve()) in painted)
    if good_test:
        test = [p for p in good_test if str(p.resolve()) not in painted]
        train = unpainted
    else:
        test, train = unpainted[1::2], unpainted[0::2]
    return {"train_good": [str(p) for p in train], "test_good": [str(p) for p in test], "painted_sources": sources}


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def print_plan(layout, pairs: list[tuple[str, str]], config: RunConfig) -> None:
    """What `run` would do, read from the dataset and the output folder only (no model is loaded)."""
    print(f"plan for {config.output} (dataset {layout.root}, layout {layout.name})")
    header = f"{'category/type':28} {'refs':>4} {'held-out':>8} {'good':>5} {'train steps':>12} {'to generate':>12}"
    print(header)
    total_steps = total_images = 0
    counted: set[Path] = set()  # one model per object: a category's run trains once
    for cat, t in pairs:
        folders = job_folder(config).type_folders(cat, t)
        steps = config.train.steps
        split = make_split(layout, cat, t)
        checkpoints = list_checkpoints(folders.run)
        done = int(checkpoints[-1].name.split("-")[1]) if checkpoints else 0
        steps_left = 0 if _train_state(folders.run, steps) == "complete" or folders.run in counted \
            else steps - done
        counted.add(folders.run)
        total_steps += steps_left
        to_generate = max(0, config.generate.count - manifest_count(folders.generated))
        total_images += to_generate
        print(f"{cat + '/' + t:28} {len(split.reference):>4} {len(split.held_out):>8} "
              f"{len(layout.good_images(cat)):>5} {steps_left:>12} {to_generate:>12}")
    models = f" in {len(counted)} model(s), one per object" if config.one_model_per_object else ""
    print(f"{len(pairs)} defect type(s){models}, {total_steps} training steps in all, batch {config.train.batch_size}, "
          f"{config.generate.candidates} candidates per image; downstream: {config.downstream}")
    sampling = config.generate.sampling_for(config.train.model)  # the steps the base recommends, if unset
    print(protocol_estimate(resolve_device(config.generate.device), base_architecture(config.train.model),
                            len(counted), total_steps, config.train.batch_size, config.train.resolution, len(pairs),
                            total_images, sampling.candidates, sampling.steps))


def run_all(config: RunConfig, feature_extractor: nn.Module | None = None, distance: Any = None,
            note: str | None = None) -> list[TypeResult]:
    """The whole job; returns one result per defect type (failures included) after writing the report.

    `feature_extractor` (KID) and `distance` (IC-LPIPS) replace the standard networks (offline demos,
    tests); `note` is shown at the top of the report. With --shard I/N only that slice of the plan is
    processed and no report is written; --report-only writes it from the recorded results.
    """
    config.validate()  # every stage's settings, before any work
    output = Path(config.output).expanduser()
    layout = open_layout(config.train.data, config.train.layout, config.train.good_images)
    pairs = plan_types(layout, config.selected_categories(), config.selected_defect_types())
    shard = config.shard_slice()
    mine = shard_pairs(pairs, shard)
    if config.dry_run:
        if shard:
            print(f"shard {shard[0]}/{shard[1]}: {len(mine)} of the plan's {len(pairs)} defect type(s)")
        if pairs:
            print_plan(layout, mine, config)
    injected = {"injected_kid": feature_extractor is not None, "injected_lpips": distance is not None}
    if config.dry_run:  # a plan that cannot finish is refused by the dry run too
        preflight(config, layout, pairs, **injected)
        print("pre-flight: every defect type has references, every category defect-free images, and every "
              "network the plan needs is here or downloadable.")
        return []
    if config.executor == "ray":
        import_ray()  # a missing extra is named before anything is written
    evaluate_kwargs = {"feature_extractor": feature_extractor, "distance": distance, "note": note}
    if config.report_only:
        return _report_only(config, output, pairs, evaluate_kwargs)
    preflight(config, layout, pairs, weights=False)  # a plan of nothing writes nothing
    claim_folder(output, "run")  # an empty or new folder, or one `run` wrote: never a foreign one
    # a whole run is the only writer; the shards of one job share the folder (each type has its own lock)
    holder = f"run --shard {shard[0]}/{shard[1]}" if shard else "run"
    with folder_lock(output, holder, shared=shard is not None):
        # before the first training step (a foreign folder or a held lock is named first)
        preflight(config, layout, pairs, plan=False, **injected)
        with _executor(config) as executor:
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
        with RayExecutor(config) as executor:  # Ray itself, an optional extra, is imported by its constructor
            yield executor
    else:
        yield LocalExecutor()


@contextlib.contextmanager
def _run_log(output: Path):
    handler = logging.FileHandler(JobFolder(output).log)
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
    write_json(job_folder(config).settings, config.recorded())
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
    if not job_folder(config).settings.is_file():
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
    if config.export and any(r.n_generated for r in results):
        for name, folder in export(output, job_folder(config).root / "export", parse_formats(config.export),
                                   config.export_prefix).items():
            log.info("exported %s: %s", name, folder)
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
        print(f"\nreport: {JobFolder(output).report}")


def _row_cautions(r: TypeResult) -> list[str]:
    """What makes a type's numbers in the run's table weak (its evaluation report says more)."""
    cautions = []
    if r.kid_x1e3 is not None and r.n_held_out < KID_RELIABLE_N:
        cautions.append(f"KID on {r.n_held_out} real images (fewer than about {KID_RELIABLE_N}) is unreliable"
                        + ("; below 0 it means no measurable difference" if r.kid_x1e3 < 0 else ""))
    return cautions


def _write_report(config: RunConfig, output: Path, results: list[TypeResult], downstream: dict[str, str],
                  note: str | None, seconds: float) -> None:
    """summary.json, report.html and report.md of the whole run."""
    job = job_folder(config)
    write_json(job.summary, {
        "results": [asdict(r) for r in results], "downstream": downstream, "seconds": round(seconds, 1),
        "note": note,
    })

    def num(v: float | None, fmt: str) -> str:
        return format(v, fmt) if v is not None else "-"

    rows, sections = [], []
    for r in results:
        folders = job.type_folders(r.category, r.defect_type)
        eval_report = folders.eval_report
        kid = f"{num(r.kid_x1e3, '.2f')} ± {num(r.kid_std_x1e3, '.2f')}" if r.kid_x1e3 is not None else "-"
        rows.append({
            "category": r.category, "defect type": r.defect_type,
            "status": r.status if not r.error else f"{r.status}: {r.error}",
            "references": str(r.n_references), "held out": str(r.n_held_out), "generated": str(r.n_generated),
            "KID x10^3 (± std)": kid, "IC-LPIPS": num(r.ic_lpips, ".3f"),
            "run": os.path.relpath(folders.run, output),
            # a failed type may have no evaluation: no link to a report that does not exist
            "evaluation": os.path.relpath(eval_report, output) if eval_report.is_file() else None,
            "cautions": _row_cautions(r),
        })
        untrained = selection_network(folders.generated) == "untrained AlexNet"
        sections.append({"title": f"{r.category} / {r.defect_type}",
                         "grid": folders.eval / f"{sample_grid_name(r.category, r.defect_type)}.png",
                         "preview": preview_path(folders.generated), "cautions": [UNTRAINED_LFS] if untrained else []})
    write_run_report(output, rows, sections, downstream, note, seconds)


# --------------------------------------------------------------------------- command


def run_command(args: argparse.Namespace) -> int:
    """`defectfill run`: the flags (and --config file) as a RunConfig, then the whole job."""
    results = run_all(RunConfig.from_args(args))
    return 1 if any(r.status != "done" for r in results) else 0
