"""Bounds, choices and identity declared once on the setting, and messages that name the setting as the command
being built names it: `run --generate-steps 0` names --generate-steps, not generate's --steps."""

from __future__ import annotations

import pytest

from defectfill.cli import main
from defectfill.config.settings import rename_settings, settings_named
from defectfill.config.stages import (
    NON_IDENTITY_KEYS,
    RUN_NON_IDENTITY_KEYS,
    EvaluateConfig,
    RunConfig,
    TrainConfig,
)
from defectfill.core.errors import DefectFillError


def _error(capsys, *args: str) -> str:
    assert main(list(args)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("flags, named, not_named", [
    (["--generate-steps", "0"], "--generate-steps must be at least 1", "--steps "),  # generate's steps
    (["--downstream-epochs", "0"], "--downstream-epochs must be at least 1", "--epochs "),
    (["--downstream-lr", "0"], "--downstream-lr must be positive", "--lr "),
    (["--downstream-batch-size", "0"], "--downstream-batch-size must be at least 1", "--batch-size "),
    (["--generate-batch-size", "0"], "--generate-batch-size must be at least 1", "--batch-size "),
    (["--steps", "0"], "--steps must be at least 1", "--generate-steps"),  # the training's steps: run's --steps
    (["--batch-size", "0"], "--batch-size must be at least 1", "--downstream-batch-size"),
    (["--task-retries", "-1"], "--task-retries must be 0 or more", None),
])
def test_run_names_its_own_flag(capsys, tmp_path, flags, named, not_named):
    err = _error(capsys, "run", "--data", str(tmp_path), "--output", str(tmp_path / "out"), "--dry-run", *flags)
    assert named in err
    if not_named:
        assert not_named not in err


@pytest.mark.parametrize("command, flags, named", [
    ("train", ["--steps", "0"], "--steps must be at least 1 (got 0)"),
    ("train", ["--alpha", "2"], "--alpha must be in [0, 1] (got 2.0)"),
    ("generate", ["--count", "0"], "--count must be at least 1 (got 0)"),
    ("evaluate", ["--epochs", "0"], "--epochs must be at least 1 (got 0)"),
])
def test_each_command_names_its_flag(capsys, tmp_path, command, flags, named):
    required = {"train": ["--data", str(tmp_path), "--category", "c", "--defect-type", "t", "--output", str(tmp_path)],
                "generate": ["--run", str(tmp_path), "--output", str(tmp_path / "g"), "--count", "1"],
                "evaluate": ["--generated", str(tmp_path), "--output", str(tmp_path / "e")]}[command]
    assert named in _error(capsys, command, *required, *flags)


def test_a_python_api_names_its_parameters():
    with pytest.raises(DefectFillError, match=r"^steps= must be at least 1 \(got 0\)\.$"):
        TrainConfig(steps=0).named_as(python=True).validate()
    # messages a stage writes by hand are rendered too: its flags, or a Python API's parameter names
    assert rename_settings("--candidates must be at least 1", python=True, known={"candidates"}) == \
        "candidates= must be at least 1"
    assert rename_settings("--steps must be at least 1; --no-kid", {"steps": "generate_steps"}) == \
        "--generate-steps must be at least 1; --no-kid"
    with pytest.raises(DefectFillError, match=r"^guidance= must be 0 or more$"):
        with settings_named(python=True, known={"guidance"}):
            raise DefectFillError("--guidance must be 0 or more")


def test_the_generator_names_its_python_parameters():
    """DefectGenerator's sampling settings are SamplingConfig's, checked with their Python parameter names."""
    from defectfill.config.sampling import SamplingConfig
    from defectfill.generate.generator import DefectGenerator

    for settings, message in (({"candidates": 0}, r"^candidates= must be at least 1 \(got 0\)\.$"),
                              ({"steps": 0}, r"^steps= must be at least 1"),
                              ({"guidance": -1.0}, r"^guidance= must be 0 or more"),
                              ({"feather": -1}, r"^feather= must be 0 or more"),
                              ({"batch_size": 0}, r"^batch_size= must be at least 1"),
                              ({"unconditional": "both"}, r"^unconditional= 'both': choose one of tuned, base")):
        with pytest.raises(DefectFillError, match=message):
            DefectGenerator(None, "A photo of sks", "sks", 64, **settings)
        with pytest.raises(DefectFillError, match=message):
            DefectGenerator(None, "A photo of sks", "sks", 64, SamplingConfig(**settings))
    # one SamplingConfig, or its settings by name over it; unset ones are the paper's
    gen = DefectGenerator(None, "A photo of sks", "sks", 64, SamplingConfig(candidates=3, guidance=2.0), steps=4)
    assert (gen.candidates, gen.steps, gen.guidance, gen.unconditional, gen.batch_size, gen.feather) == \
        (3, 4, 2.0, "tuned", 3, 0)
    gen.guidance = 1.0
    assert gen.sampling.guidance == 1.0
    assert DefectGenerator(None, "p {token}", "t", 64).sampling == SamplingConfig().resolved() == SamplingConfig(
        candidates=8, steps=50, guidance=7.5, unconditional="tuned")
    with pytest.raises(TypeError, match="sampling= takes a SamplingConfig"):
        DefectGenerator(None, "A photo of sks", "sks", 64, 4)
    with pytest.raises(TypeError, match="unexpected keyword"):
        DefectGenerator(None, "A photo of sks", "sks", 64, candiates=4)


def test_generate_and_run_declare_the_sampling_settings_once():
    """generate's and run's sampling flags are SamplingConfig's fields: same defaults, help and bounds."""
    import dataclasses

    from defectfill.config.sampling import SamplingConfig
    from defectfill.config.stages import GenerateConfig

    own = {f.name: f for f in dataclasses.fields(GenerateConfig)}
    for f in dataclasses.fields(SamplingConfig):
        assert own[f.name].default == f.default and own[f.name].metadata == f.metadata, f.name
    config = GenerateConfig(candidates=2, steps=3, guidance=1.5, feather=1, batch_size=2, scheduler="dpm")
    assert config.sampling == SamplingConfig(candidates=2, steps=3, guidance=1.5, feather=1, batch_size=2,
                                             scheduler="dpm")
    assert RunConfig().generate.sampling == SamplingConfig()


def test_declared_bounds_check_a_hand_made_config_too():
    with pytest.raises(DefectFillError, match=r"--lpips-size must be at least 32 \(got 16\)"):
        EvaluateConfig(generated="g", output="o", lpips_size=16).validate()
    with pytest.raises(DefectFillError, match=r"--downstream-image-size must be at least 32"):
        RunConfig.build({"data": "d", "output": "o", "downstream_image_size": 16})


def test_identity_is_declared_on_the_settings():
    assert NON_IDENTITY_KEYS == {"output", "resume", "steps", "save_every", "sample_every", "sample_steps",
                                 "log_every", "data", "mixed_precision", "compile", "checkpoints_total_limit",
                                 "report_to", "token_check", "token_check_masks", "token_check_steps"}
    assert RUN_NON_IDENTITY_KEYS == {"executor", "ray_address", "gpus_per_task", "task_retries", "shard",
                                     "report_only"}
    recorded = RunConfig.build({"data": "d", "output": "o", "executor": "ray", "task_retries": 5}).recorded()
    assert "executor" not in recorded and "task_retries" not in recorded and recorded["steps"] == 2000
