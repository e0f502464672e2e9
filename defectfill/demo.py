"""`defectfill demo`: the whole job on a drawn dataset and a tiny untrained model, offline, on a CPU.

It shows the pipeline working end to end (train, generate with Low-Fidelity
Selection, evaluate, report), not defect quality: the tiny network is untrained
and the metric networks are untrained stand-ins, because nothing is downloaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn as nn

from defectfill.config import RunConfig
from defectfill.folders import claim_folder
from defectfill.runner import run_all

NOTE = ("Demo: a tiny, untrained diffusion network on a procedurally drawn dataset, with untrained stand-ins "
        "for the Inception (KID) and AlexNet (LPIPS) networks, so nothing is downloaded. It shows the pipeline "
        "working end to end, not defect quality; its numbers mean nothing.")

REAL_COMMAND = ("defectfill run --data ~/mvtec_ad --category hazelnut --output work/hazelnut "
                "(downloads SD2 inpainting; needs a GPU)")

# name -> (train steps, images per type, candidates, sampling steps, downstream)
SIZES = {
    "test": dict(steps=2, count=3, candidates=2, generate_steps=2, downstream="none"),
    "small": dict(steps=100, count=8, candidates=4, generate_steps=10, downstream="both"),
}


class UntrainedFeatures(nn.Module):
    """A fixed random conv net as the KID feature extractor of the demo: uint8 (N,3,H,W) -> (N,64)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.net = nn.Sequential(
                nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            )
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.float() / 127.5 - 1.0)


def run_demo(output: str | Path, size: str = "small") -> int:
    from defectfill.demo_data import make_demo_dataset
    from defectfill.metrics.ic_lpips import lpips_distance_fn
    from defectfill.metrics.lpips import load_lpips
    from defectfill.tiny import save_tiny_pipeline

    output = claim_folder(output, "demo")  # never into a folder that holds something else
    plan = SIZES[size]
    print(NOTE)
    data, model = output / "data", output / "model"
    if not (data / ".complete").is_file():
        make_demo_dataset(data)
        (data / ".complete").write_text("")
    if not (model / "model_index.json").is_file():
        save_tiny_pipeline(model)
    config = RunConfig.from_settings(dict(
        data=str(data), model=str(model), output=str(output / "work"), resolution=64, steps=plan["steps"],
        batch_size=2, warmup_steps=min(10, plan["steps"]), save_every=max(1, plan["steps"] // 2),
        sample_every=plan["steps"], sample_steps=5, log_every=10, mixed_precision="no",
        count=plan["count"], candidates=plan["candidates"], generate_steps=plan["generate_steps"],
        downstream=plan["downstream"], downstream_epochs=2, downstream_image_size=64, downstream_pretrained=False,
        kid_subsets=20, lpips_size=64, lpips_random_backbone=True,
    ))
    results = run_all(config, feature_extractor=UntrainedFeatures(),
                      distance=lpips_distance_fn(load_lpips(pretrained_backbone=False)), note=NOTE)
    print(f"\n{NOTE}\nThe report: {output / 'work' / 'report.html'}\nFor real defects: {REAL_COMMAND}")
    return 1 if any(r.status != "done" for r in results) else 0


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="demo-output", help="folder for the dataset, model and results")
    parser.add_argument("--size", default="small", choices=sorted(SIZES),
                        help="small: half a minute (idle) to a few minutes (busy) on 2 CPU cores; "
                             "test: seconds (the test suite's setting)")


def demo_command(args: argparse.Namespace) -> int:
    return run_demo(args.output, args.size)
