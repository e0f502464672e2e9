"""The package layout (README "Layout"): the lazy public API, `defectfill --help` without torch, and the old module
paths that still work for one release with a DeprecationWarning (the one test that uses them)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120, capture_output=True,
                          text=True).stdout.strip()


def test_import_defectfill_and_defectfill_help_import_no_torch():
    code = ("import contextlib, io, sys\n"
            "import defectfill\n"
            "from defectfill import DefectFillError, EvaluateConfig, GenerateConfig, RunConfig, TrainConfig\n"
            "import defectfill.cli as cli\n"
            "parser = cli.build_parser()\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
            "    cli.main(['--help'])\n"
            "assert 'pretrain-base' in out.getvalue(), out.getvalue()\n"
            "parser.parse_args(['generate', '--run', 'r', '--output', 'o'])\n"
            "print('torch' in sys.modules)\n")
    assert _python(code) == "False"


def test_the_public_api_names_the_stages():
    import defectfill
    from defectfill import (
        DefectFillError,
        DefectGenerator,
        EvaluateConfig,
        GenerateConfig,
        RunConfig,
        TrainConfig,
        evaluate,
        load_pipeline,
        run_all,
        train,
    )
    from defectfill.config.stages import TrainConfig as StageTrainConfig
    from defectfill.core.errors import DefectFillError as CoreError
    from defectfill.evaluate.evaluator import evaluate as evaluate_function
    from defectfill.generate.generator import DefectGenerator as Generator
    from defectfill.model.pipeline import load_pipeline as load
    from defectfill.run.runner import run_all as run
    from defectfill.train.trainer import train as train_function

    assert (TrainConfig, DefectGenerator, run_all, load_pipeline, DefectFillError) == (
        StageTrainConfig, Generator, run, load, CoreError)
    assert GenerateConfig.__module__ == EvaluateConfig.__module__ == RunConfig.__module__ == "defectfill.config.stages"
    # `train` and `evaluate` are the stage packages, callable as their functions
    assert train is defectfill.train and train.train is train_function and callable(train)
    assert evaluate is defectfill.evaluate and evaluate.evaluate is evaluate_function and callable(evaluate)
    with pytest.raises(AttributeError):
        defectfill.no_such_name  # noqa: B018


def test_calling_the_train_package_calls_train(monkeypatch):
    import defectfill
    import defectfill.train.trainer

    monkeypatch.setattr(defectfill.train.trainer, "train", lambda config, **kw: ("trained", config, kw))
    assert defectfill.train("c", resume=None) == ("trained", "c", {"resume": None})


def test_the_old_module_paths_warn_and_still_work():
    from defectfill.core.errors import DefectFillError
    from defectfill.generate.generator import DefectGenerator
    from defectfill.model.canvas import prepare_canvas
    from defectfill.outputs.checkpoints import save_checkpoint
    from defectfill.outputs.generated import OutputFolder, output_identity

    # no file at the old paths (git then sees the moves as renames): an import hook serves them
    assert not (ROOT / "defectfill" / "sampler.py").exists()
    for name in ("defectfill.sampler", "defectfill.errors"):
        sys.modules.pop(name, None)
    with pytest.warns(DeprecationWarning, match="defectfill.sampler is deprecated"):
        sampler = importlib.import_module("defectfill.sampler")
    assert sampler.DefectGenerator is DefectGenerator and sampler.prepare_canvas is prepare_canvas
    with pytest.warns(DeprecationWarning, match="defectfill.errors is deprecated"):
        errors = importlib.import_module("defectfill.errors")
    assert errors.DefectFillError is DefectFillError
    sys.modules.pop("defectfill.metrics", None)
    with pytest.warns(DeprecationWarning, match="defectfill.metrics is deprecated"):
        metrics = importlib.import_module("defectfill.metrics")
    from defectfill.evaluate.metrics import kid

    assert metrics.kid is kid

    import defectfill.config
    import defectfill.evaluate
    import defectfill.generate
    import defectfill.train

    # the packages that replaced modules serve the old modules' other names, with a warning naming the new place
    with pytest.warns(DeprecationWarning, match="use defectfill.outputs.checkpoints.save_checkpoint"):
        assert defectfill.train.save_checkpoint is save_checkpoint
    with pytest.warns(DeprecationWarning, match="use defectfill.outputs.generated.OutputFolder"):
        assert defectfill.generate.OutputFolder is OutputFolder
    with pytest.warns(DeprecationWarning, match="use defectfill.outputs.generated.output_identity"):
        assert defectfill.generate._identity is output_identity
    with pytest.warns(DeprecationWarning, match="use defectfill.config.stages.sampling_checks"):
        assert callable(defectfill.config.sampling_checks)
    with pytest.warns(DeprecationWarning, match="use defectfill.outputs.report.write_report"):
        assert callable(defectfill.evaluate.write_report)
    with pytest.raises(AttributeError):
        defectfill.generate.no_such_name  # noqa: B018


def test_the_new_paths_do_not_warn(recwarn):
    from defectfill.config import RunConfig, TrainConfig  # noqa: F401
    from defectfill.evaluate import (
        evaluate,  # noqa: F401
        metrics,  # noqa: F401
    )
    from defectfill.generate import DefectGenerator, run_generate  # noqa: F401
    from defectfill.train import losses, train  # noqa: F401

    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)
                and "defectfill" in str(w.message)]
