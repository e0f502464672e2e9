"""Small helpers shared by the trainer tests."""

from __future__ import annotations

from pathlib import Path

from defectfill.config import TrainConfig


def tiny_config(data: Path, output: Path, model: Path, **overrides) -> TrainConfig:
    """Settings for a seconds-long CPU run on the tiny pipeline and the 64 px demo data."""
    settings = dict(
        data=str(data), category="disc", defect_type="scratch", output=str(output), model=str(model),
        resolution=64, steps=2, batch_size=2, warmup_steps=2, save_every=1000, sample_every=0, log_every=1,
    )
    settings.update(overrides)
    return TrainConfig(**settings)
