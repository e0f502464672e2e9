"""The `run` job folder: what `defectfill run` writes, one folder per stage and defect type.

    <output>/
      run.json                       the RunConfig of the job (every flat setting but those of the invocation)
      run.log                        the job's text log (every Ray task appends to it)
      runs/<category>-<type>/        training run (LoRA, config, split, checkpoints: run_folder.py)
      runs/<category>/               with --one-model-per-object: the category's one run, every type's token
      generated/<category>-<type>/   generated images of that type (MVTec layout, manifest, preview: generated.py)
      synth/                         every generated image, one MVTec-layout dataset (hard links)
      eval/<category>-<type>/        KID, IC-LPIPS and their report (report.py)
      eval/<category>-downstream/    the inspection models (with --downstream)
      results/<category>-<type>.json each type's result as it finished (what --report-only reads)
      results/.<category>-<type>.lock  held while a job processes the type
      report.html, report.md, summary.json

This module is the one place that knows these names; `RunConfig` derives each type's stage settings from the
folders given here (`JobFolder.type_folders`).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from defectfill.outputs.report import METRICS_NAME, REPORT_HTML

RUN_SETTINGS = "run.json"
RUN_LOG = "run.log"
SUMMARY = "summary.json"
RUNS = "runs"
GENERATED = "generated"
SYNTH = "synth"
EVAL = "eval"
RESULTS = "results"


def type_key(category: str, defect_type: str) -> str:
    """The name of a type's folders and result: `<category>-<type>`."""
    return f"{category}-{defect_type}"


class TypeFolders(NamedTuple):
    """The three folders of one defect type in a job."""

    run: Path  # the training run (shared by the category's types with --one-model-per-object)
    generated: Path
    eval: Path

    @property
    def metrics(self) -> Path:
        """The evaluation's metrics.json."""
        return self.eval / METRICS_NAME

    @property
    def eval_report(self) -> Path:
        return self.eval / REPORT_HTML


class JobFolder:
    """The files of one `run` job folder (`root`)."""

    def __init__(self, root: str | Path | None, one_model_per_object: bool = False):
        self.root = Path(root or ".").expanduser()
        self.one_model_per_object = one_model_per_object

    def type_folders(self, category: str, defect_type: str) -> TypeFolders:
        key = type_key(category, defect_type)
        # one model per object: every type of the category is drawn from runs/<category>/
        run = self.root / RUNS / (category if self.one_model_per_object else key)
        return TypeFolders(run, self.root / GENERATED / key, self.root / EVAL / key)

    def downstream_eval(self, category: str) -> Path:
        """The evaluation folder of a category's inspection models."""
        return self.root / EVAL / f"{category}-downstream"

    @property
    def results(self) -> Path:
        return self.root / RESULTS

    def result_path(self, category: str, defect_type: str) -> Path:
        return self.results / f"{type_key(category, defect_type)}.json"

    def type_lock_name(self, category: str, defect_type: str) -> str:
        """The lock file (in `results`) a job holds while it processes the type."""
        return f".{type_key(category, defect_type)}.lock"

    @property
    def synth(self) -> Path:
        return self.root / SYNTH

    @property
    def settings(self) -> Path:
        return self.root / RUN_SETTINGS

    @property
    def log(self) -> Path:
        return self.root / RUN_LOG

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY

    @property
    def report(self) -> Path:
        return self.root / REPORT_HTML


def job_folder(config) -> JobFolder:
    """The job folder of a `RunConfig`."""
    return JobFolder(config.output, config.one_model_per_object)
