"""What a training run leaves besides its weights: a bounded number of checkpoints (--checkpoints-total-limit),
its logs through accelerate's trackers (--report-to) and its model card (README.md)."""

from __future__ import annotations

import json
import os
import re

import pytest
from helpers import tiny_config

from defectfill.core.errors import DefectFillError
from defectfill.outputs.checkpoints import TRAINER_STATE, list_checkpoints, prune_checkpoints, resolve_resume
from defectfill.train.trainer import train


def _checkpoint(run, step, complete=True):
    folder = run / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainable.safetensors").write_bytes(b"x")
    if complete:
        (folder / TRAINER_STATE).write_text(json.dumps({"step": step}))
    return folder


def test_prune_keeps_the_newest_n_and_survives_a_kill_midway(tmp_path):
    run = tmp_path / "run"
    for step in (10, 2, 30, 4):  # numeric order, not name order: checkpoint-10 is newer than checkpoint-4
        _checkpoint(run, step)
    half_written = _checkpoint(run, 99, complete=False)  # not a checkpoint yet: never counted, never deleted
    gone = prune_checkpoints(run, 2)
    assert [p.name for p in gone] == ["checkpoint-2", "checkpoint-4"]
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-10", "checkpoint-30"]
    assert half_written.is_dir()
    # a prune killed between the rename and the delete leaves a hidden folder: no resume picks it, the next
    # prune removes it
    (run / "checkpoint-10").rename(run / ".checkpoint-10.deleting")
    assert resolve_resume(run, "latest").name == "checkpoint-30"
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-30"]
    assert prune_checkpoints(run, 5) == [] and not (run / ".checkpoint-10.deleting").exists()
    with pytest.raises(ValueError):
        prune_checkpoints(run, 0)


def test_total_limit_trackers_and_model_card_of_a_real_run(demo_root, tiny_model_dir, tmp_path, monkeypatch):
    """save_every 1 over 4 steps with a limit of 2: checkpoints 3 and 4 stay, and a resume continues from 4;
    the losses reach TensorBoard through accelerate's tracker in logs/; README.md names the base, token, prompt
    and steps, and its code loads the LoRA into a stock diffusers pipeline."""
    from diffusers import StableDiffusionInpaintPipeline
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train(tiny_config(demo_root, tmp_path / "run", tiny_model_dir, steps=4, save_every=1,
                            checkpoints_total_limit=2, sample_every=4))
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-3", "checkpoint-4"]
    assert not list(run.glob(".checkpoint-*"))
    events = EventAccumulator(str(run / "logs"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/total")] == [1, 2, 3, 4]
    assert "lr/unet" in events.Tags()["scalars"] and events.Tags()["images"] == ["samples"]

    card = (run / "README.md").read_text()
    assert f"base_model: {tiny_model_dir}" in card and "`sks` (scratch)" in card
    assert "`A photo of sks`" in card and "| steps | 4 of 4" in card and "last logged losses | defect" in card
    sample = re.search(r"\]\((logs/samples/step-\d+\.png)\)", card)
    assert sample and (run / sample.group(1)).is_file()
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    loading = "\n".join(line for line in code.splitlines() if not line.startswith("image = "))
    monkeypatch.chdir(run.parent)  # the card names the run folder relative to where it lies
    scope: dict = {}
    exec(loading, scope)  # noqa: S102 - the card's own instructions, run as a user would
    pipe = scope["pipe"]
    assert isinstance(pipe, StableDiffusionInpaintPipeline)
    lora = {n: p for n, p in pipe.unet.named_parameters() if "lora_B" in n}
    assert lora and any(p.abs().sum() > 0 for p in lora.values())  # the trained LoRA, not a fresh one

    # a resume continues from the newest kept checkpoint and still keeps two
    resumed = train(tiny_config(demo_root, run, tiny_model_dir, steps=5, save_every=1, checkpoints_total_limit=2,
                                resume="latest"))
    assert [p.name for p in list_checkpoints(resumed)] == ["checkpoint-4", "checkpoint-5"]
    assert "| steps | 5 of 5" in (run / "README.md").read_text()


def test_report_to_none_writes_no_events_and_a_missing_tracker_is_named(demo_root, tiny_model_dir, tmp_path,
                                                                         monkeypatch):
    run = train(tiny_config(demo_root, tmp_path / "quiet", tiny_model_dir, steps=1, report_to="none"))
    assert not any(p.name.startswith("events.out") for p in run.rglob("*"))
    assert (run / "metrics.jsonl").is_file()  # the curves are still there, for programs and the report

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    out = tmp_path / "wandb"
    with pytest.raises(DefectFillError, match=r"--report-to wandb: the wandb package is not installed.*pip install "
                                              r"wandb.*--report-to tensorboard or none"):
        train(tiny_config(demo_root, out, tiny_model_dir, steps=1, report_to="wandb"))
    assert not out.exists() or not os.listdir(out)  # refused before anything was written


def test_report_to_and_total_limit_are_flags_of_train_and_run():
    from defectfill.cli import build_parser
    from defectfill.config.stages import RunConfig, TrainConfig

    parser = build_parser()
    args = parser.parse_args(["run", "--data", "d", "--output", "o", "--report-to", "none",
                              "--checkpoints-total-limit", "3"])
    config = RunConfig.from_args(args)
    assert (config.train.report_to, config.train.checkpoints_total_limit) == ("none", 3)
    assert TrainConfig().report_to == "tensorboard" and TrainConfig().checkpoints_total_limit is None
    with pytest.raises(DefectFillError, match="--checkpoints-total-limit"):
        TrainConfig.build({"data": "d", "category": "c", "defect_type": "t", "output": "o",
                           "checkpoints_total_limit": 0})
