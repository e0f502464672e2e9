"""Shared fixtures: a tiny diffusers inpainting pipeline saved to a folder, and a tiny MVTec-layout dataset."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny SD-inpainting pipeline (random weights, 9-channel UNet) saved with save_pretrained."""
    from defectfill.model.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-model") / "pipeline")


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A 64 px MVTec-layout dataset: categories disc (scratch, spot) and weave (crack); 6 images per type."""
    from defectfill.demo.dataset import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("data") / "mvtec")
