"""One settings flow: every stage's field is its flag, YAML key and recorded key; `run` composes the stages."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

import pytest
import torch
import yaml

from defectfill.config.settings import PRECISIONS, flag, resolve_precision
from defectfill.config.stages import EvaluateConfig, GenerateConfig, RunConfig, TrainConfig
from defectfill.core.errors import DefectFillError
from defectfill.outputs.job_folder import job_folder

STAGES = [TrainConfig, GenerateConfig, EvaluateConfig, RunConfig]


def _flags(cls) -> set[str]:
    parser = argparse.ArgumentParser()
    cls.add_arguments(parser)
    return {a.option_strings[0] for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}


@pytest.mark.parametrize("cls", STAGES, ids=lambda c: c.__name__)
def test_each_setting_is_a_flag_a_yaml_key_and_a_recorded_key(cls, tmp_path):
    names = {f.name for f in cls.flat_fields()}
    assert _flags(cls) == {flag(n) for n in names}
    assert set(cls().to_dict()) == names
    # a YAML file of the recorded keys reproduces the settings exactly
    values = {"data": "d", "output": "o", "category": "c", "defect_type": "t", "run": "r", "generated": "g", "count": 3}
    values = {k: v for k, v in values.items() if k in names}
    config = cls.from_settings(values, require=False)
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert cls.from_settings({}, config_file=path, require=False) == config


def test_run_settings_reach_the_right_stage():
    config = RunConfig.from_settings({"data": "d", "output": "o", "steps": 5, "generate_steps": 3, "candidates": 2,
                                      "seed": 7, "downstream_epochs": 4, "kid_subsets": 9, "mixed_precision": "no"})
    folders = job_folder(config).type_folders("disc", "scratch")
    train, generate = config.train_config("disc", "scratch", folders), config.generate_config("disc", "scratch", folders)
    evaluate = config.evaluate_config("disc", "scratch", folders)
    assert (train.steps, generate.steps) == (5, 3), "train and generation steps swapped"
    assert generate.candidates == 2 and generate.seed == 7 and generate.mixed_precision == "no"
    assert evaluate.epochs == 4 and evaluate.kid_subsets == 9
    assert train.output.endswith("runs/disc-scratch") and generate.run == train.output
    assert generate.output.endswith("generated/disc-scratch") and evaluate.generated == generate.output
    # each default lives in one place: the stage's own
    defaults = RunConfig()
    assert defaults.generate.candidates == GenerateConfig().candidates == 8
    assert (defaults.generate.steps, defaults.generate.guidance) == (GenerateConfig().steps, GenerateConfig().guidance)
    assert defaults.train == TrainConfig()


def test_run_records_its_settings_and_they_reproduce_it(demo_root, tmp_path, monkeypatch):
    import defectfill.evaluate.evaluator
    import defectfill.generate.writer
    import defectfill.train.trainer
    from defectfill.run.runner import run_all

    calls = []

    def spy(name):
        def record(config, *args, **kwargs):  # the stages get config objects, never argv
            calls.append((name, config))
        return record

    monkeypatch.setattr(defectfill.train.trainer, "train", spy("train"))
    monkeypatch.setattr(defectfill.generate.writer, "run_generate", spy("generate"))
    monkeypatch.setattr(defectfill.evaluate.evaluator, "evaluate", spy("evaluate"))
    monkeypatch.setattr("defectfill.run.runner.preflight", lambda *a, **k: None)  # spied stages load no network
    config = RunConfig.from_settings({"data": str(demo_root), "output": str(tmp_path / "work"), "category": "disc",
                                      "defect_types": ["scratch"], "candidates": 3, "seed": 4, "steps": 2})
    run_all(config)
    assert [(n, type(c)) for n, c in calls] == [("train", TrainConfig), ("generate", GenerateConfig),
                                                ("evaluate", EvaluateConfig)]
    assert calls[1][1].candidates == 3 and calls[1][1].seed == 4 and calls[0][1].steps == 2
    recorded = tmp_path / "work" / "run.json"
    assert RunConfig.from_settings({}, config_file=recorded) == config


@pytest.mark.parametrize("cls", [TrainConfig, GenerateConfig, RunConfig], ids=lambda c: c.__name__)
def test_a_value_outside_the_allowed_ones_is_refused_from_yaml(cls, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("mixed_precision: fp8\n")
    with pytest.raises(DefectFillError, match=r"bad.yaml.*mixed_precision.*'fp8'.*auto, no, fp16, bf16"):
        cls.from_settings({}, config_file=path, require=False)


@pytest.mark.parametrize("text, pattern", [
    ("steps: 6.7", "steps: expected a whole number"),
    ("steps: true", "steps: expected a whole number"),
    ("lr_unet: .nan", "lr_unet: expected a finite number"),
    ("token: 123", "token: expected text"),
    ("data: [a, b]", "data: expected text"),
    ("gradient_checkpointing: 1", "expected true or false"),
])
def test_yaml_values_of_the_wrong_type_are_refused_not_truncated(tmp_path, text, pattern):
    path = tmp_path / "settings.yaml"
    path.write_text(text + "\n")
    with pytest.raises(DefectFillError, match=pattern):
        TrainConfig.from_settings({}, config_file=path, require=False)


def test_run_checks_every_stage_before_any_work(demo_root, tmp_path, monkeypatch):
    import defectfill.train.trainer
    from defectfill.run.runner import run_all

    def no_training(*args, **kwargs):
        raise AssertionError("trained before the generation settings were checked")

    monkeypatch.setattr(defectfill.train.trainer, "train", no_training)
    for bad, pattern in (({"candidates": 0}, "--candidates"), ({"downstream_epochs": 0}, "--downstream-epochs"),
                         ({"kid_subsets": 0}, "--kid-subsets"), ({"mask_scale": "0.5"}, "mask")):
        with pytest.raises(DefectFillError, match=pattern):
            run_all(RunConfig.build({"data": str(demo_root), "output": str(tmp_path / "w"), "downstream": "both",
                                     **bad}, require=False, check=False))
        assert not (tmp_path / "w").exists()


# --------------------------------------------------------------------------- precision


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA machine as torch would report it; `gpu(bf16=False)` for one without bfloat16."""
    def make(bf16: bool = True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    return make


def test_auto_precision_is_bf16_or_fp16_on_a_gpu_and_full_on_a_cpu(gpu):
    assert resolve_precision("auto", "cpu") == "no"
    gpu(bf16=True)
    assert resolve_precision("auto") == "bf16" and resolve_precision("auto", "cuda:1") == "bf16"
    assert resolve_precision("auto", "cpu") == "no"
    gpu(bf16=False)
    assert resolve_precision("auto", "cuda") == "fp16"
    assert set(PRECISIONS) == {"auto", "no", "fp16", "bf16"}
    for cls in (TrainConfig, GenerateConfig):
        assert cls().mixed_precision == "auto"


def test_bf16_on_a_gpu_without_it_names_fp16(gpu):
    gpu(bf16=False)
    with pytest.raises(DefectFillError, match="does not support bfloat16.*--mixed-precision fp16"):
        resolve_precision("bf16", "cuda")


def test_half_precision_on_a_cpu_warns_and_names_the_faster_choice(caplog):
    with caplog.at_level(logging.WARNING, logger="defectfill"):
        assert resolve_precision("bf16", "cpu") == "bf16"
    assert "--mixed-precision no" in caplog.text


def test_train_records_the_resolved_precision(demo_root, tiny_model_dir, tmp_path):
    from helpers import tiny_config

    from defectfill.train.trainer import train

    out = train(dataclasses.replace(tiny_config(demo_root, tmp_path / "run", tiny_model_dir), mixed_precision="auto"))
    assert json.loads((out / "config.json").read_text())["mixed_precision"] == "no"


def test_a_broken_stage_module_fails_loudly_instead_of_hiding_its_command(monkeypatch, tmp_path):
    from defectfill.cli import build_parser, main

    monkeypatch.setitem(sys.modules, "defectfill.evaluate.evaluator", None)  # import fails
    build_parser().parse_args(["evaluate", "--run", "r", "--generated", "g", "--output", "o"])  # still offered
    with pytest.raises(ImportError):
        main(["evaluate", "--run", str(tmp_path / "r"), "--generated", str(tmp_path / "g"),
              "--output", str(tmp_path / "o")])
