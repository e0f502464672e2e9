"""One defect type of `defectfill run`: its training, generation and evaluation, each skipped when its outputs
are complete, under the type's own lock, with its result recorded in the job folder's results (`outputs.job_folder`). The local executor
(`runner.LocalExecutor`) and the Ray executor (`ray_executor.RayExecutor`, inside its tasks) both run each type
through `process_type`, and each category's downstream models through `run_downstream`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import traceback
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from defectfill.config.stages import RunConfig
from defectfill.core.atomic import write_json
from defectfill.core.errors import DefectFillError
from defectfill.core.folders import folder_lock
from defectfill.model.names import LORA_WEIGHTS_NAME
from defectfill.outputs.checkpoints import list_checkpoints
from defectfill.outputs.generated import manifest_count, manifest_path
from defectfill.outputs.job_folder import job_folder
from defectfill.outputs.report import REPORT_HTML

log = logging.getLogger("defectfill.run")


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


def _train_state(run_dir: Path, steps: int) -> str:
    """new | partial | complete, from what the run folder holds."""
    checkpoints = list_checkpoints(run_dir)
    done = int(checkpoints[-1].name.split("-")[1]) if checkpoints else 0
    if (run_dir / LORA_WEIGHTS_NAME).is_file() and done >= steps:
        return "complete"
    return "partial" if checkpoints else "new"


def _eval_complete(eval_dir: Path, gen_dir: Path) -> bool:
    report, manifest = eval_dir / REPORT_HTML, manifest_path(gen_dir)
    return report.is_file() and manifest.is_file() and report.stat().st_mtime >= manifest.stat().st_mtime


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
    job = job_folder(config)
    job.results.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + lock_wait_s
    with contextlib.ExitStack() as stack:
        while True:
            try:
                stack.enter_context(folder_lock(job.results, f"run {cat}/{defect_type}",
                                                name=job.type_lock_name(cat, defect_type)))
                break
            except DefectFillError as exc:  # the other job records its own result
                if time.monotonic() >= deadline:
                    return TypeResult(cat, defect_type, status="failed", error=f"not run: {exc}")
                time.sleep(5)
        result = _process_type(cat, defect_type, config, position, evaluate_kwargs, object_types)
        record_result(config, result)
        return result


def record_result(config: RunConfig, result: TypeResult) -> None:
    write_json(job_folder(config).result_path(result.category, result.defect_type), asdict(result))


def read_result(config: RunConfig, cat: str, defect_type: str) -> TypeResult:
    """The recorded result of a type (--report-only); status `missing` when no job has finished it."""
    path = job_folder(config).result_path(cat, defect_type)
    if not path.is_file():
        return TypeResult(cat, defect_type, status="missing",
                          error="not run yet: no job has finished this type; rerun the --shard job that holds it "
                                "(or `defectfill run` without --report-only)")
    try:
        data = json.loads(path.read_text())
        result = _checked_result(data, cat, defect_type)
    except (OSError, ValueError, TypeError) as exc:
        return TypeResult(cat, defect_type, status="failed",
                          error=f"{path}: unreadable ({exc}); rerun the --shard job that holds this type")
    return result


_RESULT_STATUSES = {"pending", "done", "failed", "missing"}


def _checked_result(data: Any, cat: str, defect_type: str) -> TypeResult:
    """A results file's content as a TypeResult, every field checked: the names come from the plan (`cat`,
    `defect_type`), never from the file, since they become paths; a wrong type raises ValueError naming the key."""
    if not isinstance(data, dict):
        raise ValueError(f"holds a {type(data).__name__}, not an object")
    for key in ("category", "defect_type"):
        if key in data and data[key] != (cat if key == "category" else defect_type):
            raise ValueError(f"{key} {data[key]!r} is not the planned {cat if key == 'category' else defect_type!r}")
    values: dict[str, Any] = {}
    for f in fields(TypeResult):
        if f.name in ("category", "defect_type") or f.name not in data:
            continue
        value = data[f.name]
        if f.name == "status":
            ok = value in _RESULT_STATUSES
        elif f.name == "stages":
            ok = isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
        elif f.name == "error":
            ok = value is None or isinstance(value, str)
        elif f.name.startswith("n_"):
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        else:  # the metrics: a number or null
            ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                   and math.isfinite(value))
        if not ok:
            raise ValueError(f"{f.name} is {value!r}, not a valid value")
        values[f.name] = value
    return TypeResult(cat, defect_type, **values)


def _process_type(cat: str, defect_type: str, config: RunConfig, position: str,
                  evaluate_kwargs: dict[str, Any], object_types: list[str] | None) -> TypeResult:
    import defectfill.train.trainer
    from defectfill.evaluate.evaluator import evaluate
    from defectfill.generate.writer import run_generate
    from defectfill.run.token_check import after_training, evaluation_probe

    result = TypeResult(cat, defect_type)
    folders = job_folder(config).type_folders(cat, defect_type)
    stage = "train"
    try:
        train_config = config.train_config(cat, defect_type, folders, object_types)
        state = _train_state(folders.run, train_config.steps)
        if state == "complete":
            result.stages["train"] = "skipped"
        else:
            print(f"{position} {cat}/{train_config.defect_type}: train ({train_config.steps} steps"
                  f"{', resuming' if state == 'partial' else ''})")
            train_config.resume = "latest" if state == "partial" else None
            defectfill.train.trainer.train(train_config)
            result.stages["train"] = "ran"
            after_training(folders.run, train_config)

        stage = "generate"
        generate_config = config.generate_config(cat, defect_type, folders)
        if manifest_count(folders.generated) >= generate_config.count:
            result.stages["generate"] = "skipped"
        else:
            print(f"{position} {cat}/{defect_type}: generate {generate_config.count} images "
                  f"({generate_config.candidates} candidates each)")
            run_generate(generate_config)
            result.stages["generate"] = "ran"
        result.n_generated = manifest_count(folders.generated)

        stage = "evaluate"
        if not (config.evaluate.kid or config.evaluate.ic_lpips):
            result.stages["evaluate"] = "off"  # --no-kid --no-ic-lpips: nothing to measure per type
        elif _eval_complete(folders.eval, folders.generated):
            result.stages["evaluate"] = "skipped"
        else:
            print(f"{position} {cat}/{defect_type}: evaluate (KID, IC-LPIPS)")
            probe = evaluation_probe if train_config.token_check else None  # the run's --no-token-check
            evaluate(config.evaluate_config(cat, defect_type, folders), token_probe=probe, **evaluate_kwargs)
            result.stages["evaluate"] = "ran"
        if folders.metrics.is_file():
            _read_metrics(result, folders.metrics)
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


def run_downstream(config: RunConfig, cat: str, synth: Path, note: str | None) -> str:
    """The inspection models of one category on the combined dataset: their report, or why they failed."""
    from defectfill.evaluate.evaluator import evaluate

    eval_dir = job_folder(config).downstream_eval(cat)
    print(f"downstream {config.downstream} on {cat}")
    try:
        evaluate(config.downstream_config(cat, synth, eval_dir), note=note)
        return str(eval_dir / REPORT_HTML)
    except DefectFillError as exc:
        return f"failed: {exc}"
