"""`defectfill demo`: the whole job on a drawn dataset, offline, on a CPU.

By default on the built-in base `defectfill-mini` (pretrained by `defectfill pretrain-base` on a drawn
industrial world that has no scratches, spots or cracks): DefectFill fine-tunes it on each demo defect type's
references, generates it with Low-Fidelity Selection, and evaluates it with the base's own VAE encoder as
the KID and IC-LPIPS network (`defectfill.evaluate.metrics.base_features`), since nothing is downloaded.
`--model tiny` runs the same job on a tiny untrained network: seconds, for tests; its pictures are noise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn as nn

from defectfill.config.stages import RunConfig
from defectfill.core.folders import claim_folder
from defectfill.run.runner import run_all

NOTES = {
    "defectfill-mini": (
        "Demo on defectfill-mini, a 21 MB base pretrained by this project on drawn parts and surfaces at 64 px "
        "(never on scratches, spots or cracks), fine-tuned per defect type on its 2 references and sampled as "
        "the base recommends (the defect prompt at guidance 5; README: what was measured on it). Low-Fidelity "
        "Selection scores the candidates with an untrained AlexNet (no download), so the kept candidate is "
        "not the perceptually least normal one. KID and IC-LPIPS use the base's own VAE encoder as the feature "
        "network (offline), so they compare runs on this data and are not comparable to published values; "
        "KID on this few images is noisy. The downstream models train from scratch."),
    "tiny": (
        "Demo on a tiny, untrained diffusion network, with untrained stand-ins for the Inception (KID) and "
        "AlexNet (LPIPS) networks, so nothing is downloaded. It shows the pipeline working end to end, not "
        "defect quality; its numbers mean nothing."),
}
MODELS = tuple(NOTES)

REAL_COMMAND = ("defectfill run --data ~/mvtec_ad --category hazelnut --output work/hazelnut "
                "(downloads SD2 inpainting; needs a GPU)")

# name -> (train steps, images per type, candidates, sampling steps, downstream)
SIZES = {
    "test": dict(steps=2, count=3, candidates=2, generate_steps=2, downstream="none"),
    "small": dict(steps=100, count=8, candidates=4, generate_steps=10, downstream="both"),
}
# DefectFill settings for defectfill-mini at 64 px (beyond the size's steps): a higher rate than SD2's
# defaults, since the base and the LoRA are small and the steps few. Sampling is what the base recommends
# (its defectfill_sampling.json; docs/method.md, "Sampling on defectfill-mini").
MINI_SETTINGS = dict(lr_unet=1e-3, lr_text=2e-4)


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


def _metric_networks(model: str, model_path: str):
    """(KID feature extractor, IC-LPIPS distance) for the demo: the base's VAE encoder, or untrained stand-ins."""
    if model == "tiny":
        from defectfill.evaluate.metrics.ic_lpips import lpips_distance_fn
        from defectfill.model.lpips import load_lpips

        return UntrainedFeatures(), lpips_distance_fn(load_lpips(pretrained_backbone=False))
    from defectfill.evaluate.metrics.base_features import base_metric_networks

    return base_metric_networks(model_path)


def run_demo(output: str | Path, size: str = "small", model: str = "defectfill-mini") -> int:
    from defectfill.demo.dataset import make_demo_dataset
    from defectfill.model.tiny import save_tiny_pipeline

    output = claim_folder(output, "demo")  # never into a folder that holds something else
    plan = SIZES[size]
    note = NOTES[model]
    print(note)
    data = output / "data"
    if not (data / ".complete").is_file():
        make_demo_dataset(data)
        (data / ".complete").write_text("")
    model_path = model
    extra: dict = {}
    if model == "tiny":
        model_path = str(output / "model")
        if not (output / "model" / "model_index.json").is_file():
            save_tiny_pipeline(output / "model")
    else:
        extra = dict(MINI_SETTINGS)
    config = RunConfig.from_settings(dict(
        data=str(data), model=model_path, output=str(output / "work"), resolution=64, steps=plan["steps"],
        batch_size=2, warmup_steps=min(10, plan["steps"]), save_every=max(1, plan["steps"] // 2),
        sample_every=plan["steps"], sample_steps=5, log_every=10, mixed_precision="no",
        count=plan["count"], candidates=plan["candidates"], generate_steps=plan["generate_steps"],
        downstream=plan["downstream"], downstream_epochs=2, downstream_image_size=64, downstream_pretrained=False,
        kid_subsets=20, lpips_size=64, lpips_random_backbone=True, **extra,
    ))
    feature_extractor, distance = _metric_networks(model, model_path)
    results = run_all(config, feature_extractor=feature_extractor, distance=distance, note=note)
    print(f"\n{note}\nThe report: {output / 'work' / 'report.html'}\nFor real defects: {REAL_COMMAND}")
    return 1 if any(r.status != "done" for r in results) else 0


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="demo-output", help="folder for the dataset, model and results")
    parser.add_argument("--size", default="small", choices=sorted(SIZES),
                        help="small: the demo (a few minutes on 2 CPU cores); test: seconds (the test suite's setting)")
    parser.add_argument("--model", default="defectfill-mini", choices=MODELS,
                        help="defectfill-mini: the built-in pretrained base; tiny: an untrained network (seconds)")


def demo_command(args: argparse.Namespace) -> int:
    return run_demo(args.output, args.size, args.model)
