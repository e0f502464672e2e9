"""Small helpers shared by the trainer tests."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from defectfill.config import TrainConfig


def tiny_config(data: Path, output: Path, model: Path, **overrides) -> TrainConfig:
    """Settings for a seconds-long CPU run on the tiny pipeline and the 64 px demo data."""
    settings = dict(
        data=str(data), category="disc", defect_type="scratch", output=str(output), model=str(model),
        resolution=64, steps=2, batch_size=2, warmup_steps=2, save_every=1000, sample_every=0, log_every=1,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def abs_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A stand-in image distance for LPIPS: mean absolute difference per pair, (N,3,H,W) x2 -> (N,)."""
    return (a - b).abs().flatten(1).mean(dim=1)


class TinyClassifier(nn.Module):
    """A stand-in for ResNet-34: one conv and a linear layer over k classes."""

    def __init__(self, k: int):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, k)

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean(dim=(2, 3)))
